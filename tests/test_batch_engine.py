"""The batch engine on the tiny model: odd images, caption files, policies, outputs, dry run, stopping."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from captioners.batch import BatchJob, Loader, TextShaping, run_batch
from captioners.batch.loading import ImageDataset, collate
from captioners.batch.steps import PreprocessStep
from captioners.batch.writing import TEMP_SUFFIX, atomic_write
from captioners.errors import CaptionerError
from tests.batch_corpus import make_corpus
from tests.batch_helpers import copy_photos, reference_caption, snapshot, temp_files


@pytest.fixture(scope="module")
def captioner(load_tiny, icg_checkpoint):
    return load_tiny(icg_checkpoint.path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "dataset")


def fresh_corpus(corpus, tmp_path: Path) -> Path:
    """A private copy of the generated corpus (shutil keeps the unreadable file's mode)."""
    target = tmp_path / "dataset"
    shutil.copytree(corpus.root, target, ignore=lambda d, names: [n for n in names if n == "unreadable.jpg"])
    return target


def readable(path: Path) -> bool:
    try:
        path.open("rb").close()
        return True
    except PermissionError:
        return False


# ---- odd images ---------------------------------------------------------------------------------
def pixels(image) -> torch.Tensor:
    return pil_to_tensor(image)


def test_dataset_gives_upright_rgb_and_reasons(corpus):
    paths = sorted(corpus.captioned) + sorted(corpus.failing)
    items = dict(ImageDataset(paths, PreprocessStep(pixels))[i] for i in range(len(paths)))
    loaded = {paths[i].name: value for i, value in items.items()}
    assert loaded["exif_rotated.jpg"].shape == (3, 120, 60)  # saved 120 x 60, shown rotated
    assert loaded["animated.gif"].shape == (3, 50, 50)
    assert loaded["huge.jpg"].shape == (3, 4000, 6000)
    assert loaded["alpha.png"][:, 0, 0].tolist() == [255, 255, 255]  # transparent corner on white
    assert loaded["palette_transparent.png"].shape[0] == 3
    gray = loaded["gray16.png"]
    assert 0 < gray.float().mean() < 255 and gray.max() > 200  # scaled from 16 bits, not clipped to white
    assert loaded["cmyk.jpg"].shape[0] == 3
    for path, phrase in corpus.failing.items():
        if path.name == "same_name.png":
            continue  # a clash of caption names, found at planning, not at loading
        assert isinstance(loaded[path.name], str) and phrase in loaded[path.name], (path.name, loaded[path.name])
    batch = collate([(0, torch.zeros(3, 2, 2)), (1, "truncated"), (2, torch.ones(3, 2, 2))])
    assert batch.indices == [0, 2] and batch.pixels.shape == (2, 3, 2, 2) and batch.failed == [(1, "truncated")]


def test_every_image_is_captioned_or_reported(captioner, corpus, tmp_path):
    root = fresh_corpus(corpus, tmp_path)
    summary = run_batch(captioner, BatchJob(inputs=[str(root)], recursive=True, batch_size=4, workers=2,
                                            report=str(tmp_path / "report.json")))
    images = [root / p.relative_to(corpus.root) for p in corpus.captioned]
    assert summary.captioned == len(images) and not summary.interrupted
    for image in images:
        caption_file = image.with_suffix(".txt")
        assert caption_file.read_text(encoding="utf-8") == reference_caption(captioner, image), image.name
    failed = dict(summary.failed)
    assert set(failed) == {str(root / p.relative_to(corpus.root)) for p in corpus.failing}
    for path, phrase in corpus.failing.items():
        assert phrase in failed[str(root / path.relative_to(corpus.root))]
    assert not list(root.rglob("*.jpg.txt")) and not list(root.rglob("*.png.txt"))
    assert not (root / ".cache" / "inside.txt").exists() and not (root / ".hidden.txt").exists()
    assert not temp_files(root)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["captioned"] == len(images)
    assert sorted(map(tuple, report["summary"]["failed"])) == sorted(summary.failed)


def test_loaders_give_the_same_captions(captioner, photos, tmp_path):
    results = {}
    for name, loader, workers in (("inline", Loader.THREADS, 0), ("threads", Loader.THREADS, 2),
                                  ("processes", Loader.PROCESSES, 2)):
        folder = tmp_path / name
        copy_photos(photos, folder, 7)
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
        summary = run_batch(captioner, BatchJob(inputs=[str(folder)], batch_size=3, workers=workers, loader=loader))
        assert summary.captioned == 7 and [Path(p).name for p, _ in summary.failed] == ["broken.jpg"]
        results[name] = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}
    assert results["inline"] == results["threads"] == results["processes"]
    assert len(results["inline"]) == 7


def test_fast_decode_captions_from_reduced_jpegs(captioner, photos, tmp_path):
    copy_photos(photos, tmp_path / "big", 3, size=(1600, 1200))
    summary = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "big")], fast_decode=True))
    assert summary.captioned == 3 and all(p.read_text() for p in (tmp_path / "big").glob("*.txt"))


# ---- where captions go --------------------------------------------------------------------------
def test_output_dir_mirrors_the_input_tree(captioner, corpus, tmp_path):
    root = fresh_corpus(corpus, tmp_path)
    before = snapshot(root)
    out = tmp_path / "captions"
    summary = run_batch(captioner, BatchJob(inputs=[str(root)], recursive=True, output_dir=str(out),
                                            extension="caption"))
    assert snapshot(root) == before, "nothing may be written beside the images"
    assert (out / "sub" / "deeper" / "Ünïcode nested.caption").is_file()
    assert (out / "unicode café 日本語 🐱.caption").is_file()
    assert (out / "dotted.name.v2.caption").is_file()
    assert summary.captioned == len(list(out.rglob("*.caption")))


def test_files_globs_and_file_lists(captioner, photos, tmp_path):
    images = copy_photos(photos, tmp_path / "a" / "b", 4)
    (tmp_path / "list.txt").write_text(f"# my picks\na/b/{images[2].name}\n{images[3]}\ngone.jpg\nnotes.md\n",
                                       encoding="utf-8")
    job = BatchJob(inputs=[str(images[0]), str(tmp_path / "a" / "**" / "img_001.jpg")],
                   file_list=str(tmp_path / "list.txt"), output_dir=str(tmp_path / "out"))
    summary = run_batch(captioner, job)
    assert summary.captioned == 4
    assert summary.failed == [(str(tmp_path / "gone.jpg"), "file not found")]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.txt")) == [f"img_00{i}.txt" for i in range(4)]
    assert (tmp_path / "out" / "b" / "img_001.txt").is_file()  # glob: mirrored below the fixed part


def test_missing_inputs_stop_before_anything_runs(captioner, tmp_path):
    with pytest.raises(CaptionerError, match="does not exist"):
        run_batch(captioner, BatchJob(inputs=[str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(CaptionerError, match="No images found"):
        run_batch(captioner, BatchJob(inputs=[str(tmp_path / "empty")]))


# ---- existing captions ---------------------------------------------------------------------------
@pytest.fixture()
def captioned_folder(photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 3)
    images[0].with_suffix(".txt").write_text("1girl, smile", encoding="utf-8")
    images[1].with_suffix(".txt").write_text("", encoding="utf-8")  # empty: not a caption yet
    return folder, images


def test_skip_keeps_existing_captions_and_fills_the_rest(captioner, captioned_folder):
    folder, images = captioned_folder
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)]))
    assert (summary.captioned, summary.skipped) == (2, 1)
    assert images[0].with_suffix(".txt").read_text() == "1girl, smile"
    assert images[1].with_suffix(".txt").read_text() == reference_caption(captioner, images[1])
    assert not list(folder.glob("*.bak*"))


@pytest.mark.parametrize("backup", [True, False])
def test_overwrite_keeps_a_backup_unless_told_not_to(captioner, captioned_folder, backup):
    folder, images = captioned_folder
    images[0].with_suffix(".txt.bak").write_text("an older backup")
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="overwrite", backup=backup))
    assert summary.captioned == 3
    assert images[0].with_suffix(".txt").read_text() == reference_caption(captioner, images[0])
    assert images[0].with_suffix(".txt.bak").read_text() == "an older backup"
    if backup:
        assert images[0].with_suffix(".txt.bak1").read_text() == "1girl, smile"
        assert summary.backups == [str(images[0].with_suffix(".txt.bak1"))]
    else:
        assert not images[0].with_suffix(".txt.bak1").exists() and not summary.backups


@pytest.mark.parametrize("policy", ["append", "prepend"])
def test_append_and_prepend_join_with_the_separator(captioner, captioned_folder, policy):
    folder, images = captioned_folder
    new = reference_caption(captioner, images[0])
    assert "," not in new  # tiny-model captions are plain words: one tag
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing=policy, separator=" | ",
                                            shaping=TextShaping(prefix="smile, ")))
    # "smile, <caption>" is shaped; its "smile" tag is dropped since the old caption has it
    expected = f"1girl, smile | {new}" if policy == "append" else f"{new} | 1girl, smile"
    assert images[0].with_suffix(".txt").read_text() == expected
    assert images[0].with_suffix(".txt.bak").read_text() == "1girl, smile"
    assert summary.captioned == 3


def test_append_refuses_a_caption_that_is_not_utf8(captioner, captioned_folder):
    folder, images = captioned_folder
    images[0].with_suffix(".txt").write_bytes("café, Ünïcode".encode("cp1252"))
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="append"))
    assert [Path(p).name for p, _ in summary.failed] == [images[0].name]
    assert "not UTF-8" in summary.failed[0][1]
    assert images[0].with_suffix(".txt").read_bytes() == "café, Ünïcode".encode("cp1252")
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="overwrite"))
    assert images[0].with_suffix(".txt.bak").read_bytes() == "café, Ünïcode".encode("cp1252")


def test_dry_run_writes_nothing_and_lists_changes(captioner, captioned_folder, tmp_path):
    folder, images = captioned_folder
    before = snapshot(tmp_path)
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="append", dry_run=True,
                                            jsonl=str(tmp_path / "all.jsonl"), kohya_json=str(tmp_path / "m.json"),
                                            report=str(tmp_path / "report.json"), output_dir=str(tmp_path / "out")))
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    actions = {Path(c["caption_file"]).name: c["action"] for c in summary.changes}
    assert actions == {"img_000.txt": "create", "img_001.txt": "create", "img_002.txt": "create",
                       "all.jsonl": "write", "m.json": "write"}
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="append", dry_run=True))
    changes = {Path(c["caption_file"]).name: c for c in summary.changes}
    assert changes["img_000.txt"]["action"] == "append" and changes["img_000.txt"]["old"] == "1girl, smile"
    assert changes["img_001.txt"]["new"] == reference_caption(captioner, images[1])
    assert snapshot(tmp_path) == before and summary.dry_run and not summary.written


# ---- combined outputs --------------------------------------------------------------------------------
def test_combined_outputs_and_kohya_merge(captioner, captioned_folder, tmp_path):
    folder, images = captioned_folder
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps({
        "other_image": {"caption": "keep me", "tags": "a, b"},
        "img_002": {"caption": "old", "tags": "kept tags", "train_resolution": [512, 512]}}), encoding="utf-8")
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], jsonl=str(tmp_path / "out" / "all.jsonl"),
                                            csv=str(tmp_path / "all.csv"), kohya_json=str(metadata)))
    captions = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    merged = json.loads(metadata.read_text(encoding="utf-8"))
    assert merged["other_image"] == {"caption": "keep me", "tags": "a, b"}
    assert merged["img_002"] == {"caption": captions["img_002"], "tags": "kept tags", "train_resolution": [512, 512]}
    assert merged["img_000"] == {"caption": "1girl, smile"}  # kept by skip, still listed
    assert json.loads((tmp_path / "meta.json.bak").read_text())["img_002"]["caption"] == "old"
    lines = [json.loads(line) for line in (tmp_path / "out" / "all.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [Path(r["path"]).name for r in lines] == [p.name for p in images]
    assert lines[0]["new"] is False and lines[0]["model"] is None
    assert lines[1]["model"] == captioner.spec.id and lines[1]["options"]["strategy"] == "greedy"
    rows = list(csv.reader((tmp_path / "all.csv").open(encoding="utf-8", newline="")))
    assert rows[0] == ["path", "caption", "model"] and rows[2][1] == captions["img_001"]
    assert str(metadata) in summary.written


def test_kohya_keys_are_stems_or_full_paths(captioner, photos, tmp_path):
    copy_photos(photos, tmp_path / "set" / "a", 2)
    copy_photos(photos[1:], tmp_path / "set" / "b", 1)  # b/img_000.jpg: the same stem as a/img_000.jpg
    metadata = tmp_path / "meta.json"
    summary = run_batch(captioner, BatchJob(inputs=[str(tmp_path / "set")], recursive=True, kohya_json=str(metadata)))
    assert sorted(json.loads(metadata.read_text())) == ["img_000", "img_001"]
    assert len(summary.warnings) == 1 and "'img_000' is shared by" in summary.warnings[0][1]
    run_batch(captioner, BatchJob(inputs=[str(tmp_path / "set")], recursive=True, kohya_json=str(metadata),
                                  kohya_full_path=True))
    keys = set(json.loads(metadata.read_text()))
    assert {str((tmp_path / "set" / d / "img_000.jpg").resolve()) for d in "ab"} <= keys
    assert {"img_000", "img_001"} <= keys  # the earlier entries are kept


def test_unreadable_kohya_metadata_stops_the_run_before_it_starts(captioner, captioned_folder, tmp_path):
    folder, _ = captioned_folder
    (tmp_path / "meta.json").write_text("{not json")
    before = snapshot(folder)
    with pytest.raises(CaptionerError, match="not readable JSON"):
        run_batch(captioner, BatchJob(inputs=[str(folder)], kohya_json=str(tmp_path / "meta.json")))
    assert snapshot(folder) == before


def test_long_captions_are_reported(captioner, captioned_folder):
    folder, _ = captioned_folder
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="overwrite",
                                            shaping=TextShaping(suffix=", a very long tail" * 20, max_tokens=75)))
    assert len(summary.warnings) == 3 and "CLIP tokens" in summary.warnings[0][1]


# ---- stopping, failures, atomic writes -------------------------------------------------------------
def test_should_stop_ends_cleanly_between_batches_and_a_rerun_finishes(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 9)
    seen = []
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], batch_size=2),
                        on_progress=seen.append, should_stop=lambda: len(seen) >= 3)
    assert summary.interrupted and summary.captioned == 4
    assert [p.done for p in seen] == [0, 2, 4] and seen[0].total == 9 and seen[-1].eta_s > 0
    assert len(list(folder.glob("*.txt"))) == 4 and not temp_files(folder)
    progress = []
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], batch_size=2), on_progress=progress.append)
    assert (summary.captioned, summary.skipped, summary.interrupted) == (5, 4, False)
    assert progress[0].done == 4 and progress[-1].done == 9 and progress[-1].eta_s == 0
    assert progress[-1].recent and progress[-1].images_per_s > 0
    for image in images:
        assert image.with_suffix(".txt").read_text() == reference_caption(captioner, image)


def test_a_model_error_fails_its_batch_and_the_run_goes_on(captioner, photos, tmp_path, monkeypatch):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 6)
    real = type(captioner).caption_candidates  # every batch's model call
    calls = []

    def flaky(self, pixels, options):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, pixels, options)

    monkeypatch.setattr(type(captioner), "caption_candidates", flaky)
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], batch_size=2))
    assert summary.captioned == 4 and len(summary.failed) == 2
    assert all("out of memory" in reason for _, reason in summary.failed)


def test_unwritable_caption_files_are_reported(captioner, photos, tmp_path, monkeypatch):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 3)
    real_open = open

    def refuse(file, mode="r", *args, **kwargs):
        if "x" in mode and "img_001" in str(file):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)]))
    assert summary.captioned == 2 and "No space left on device" in summary.failed[0][1]
    assert not (folder / "img_001.txt").exists() and not temp_files(folder)


def test_an_interrupted_write_leaves_the_old_caption_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("the user's caption")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new caption")
    assert target.read_text() == "the user's caption" and not temp_files(tmp_path)


def test_a_rerun_removes_temp_files_of_dead_runs_only(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 2)
    dead = folder / f".img_000.txt.{2 ** 22 + 12345}.abcd1234{TEMP_SUFFIX}"  # above Linux's default pid_max
    alive = folder / f".img_001.txt.{os.getppid()}.abcd1234{TEMP_SUFFIX}"
    dead.write_text("half")
    alive.write_text("being written by a live process")
    run_batch(captioner, BatchJob(inputs=[str(folder)]))
    assert not dead.exists() and alive.exists()
    assert len(list(folder.glob("*.txt"))) == 2
