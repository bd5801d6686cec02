"""The batch engine never loses a caption or a user's file: outputs checked by real path before the
model loads, failures at the end reported, reruns exactly once, any file name, links never followed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from captioners import cli
from captioners.base import Captioner
from captioners.batch import BatchJob, run_batch
from captioners.errors import CaptionerError
from tests.batch_helpers import copy_photos, model_args, snapshot

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def captioner(load_tiny, icg_checkpoint):
    return load_tiny(icg_checkpoint.path)


@pytest.fixture(scope="module")
def tiny_args(icg_checkpoint, tiny_clip, tokenizer_dir, tmp_path_factory) -> list[str]:
    return model_args(icg_checkpoint.path, tiny_clip, tokenizer_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture()
def dataset(photos, tmp_path) -> Path:
    folder = tmp_path / "ds"
    copy_photos(photos, folder, 3)
    (folder / "img_001.txt").write_text("a caption the user wrote", encoding="utf-8")
    (folder / "notes.txt").write_text("the user's notes", encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"img_000": {"caption": "old", "tags": "keep"}}), encoding="utf-8")
    return folder


@pytest.fixture()
def no_model_load(monkeypatch):
    """The model must not load: these runs are refused before."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(Captioner, "load", refuse)


# ---- 4. outputs compared by real path, checked before the model loads ----------------------------
@pytest.mark.parametrize("outputs, words", [
    (["--kohya-json", "{ds}/meta.json", "--report", "{ds}/./meta.json"], "is the same file as kohya_json"),
    (["--jsonl", "{ds}/img_001.txt", "--no-backup"], "is the caption file of"),
    (["--jsonl", "{ds}/sub/../img_002.txt"], "is the caption file of"),
    (["--csv", "{ds}/img_000.jpg"], "is an input image"),
    (["--report", "{ds}/img_000.jpg/report.json"], "is a file, not a folder"),
    (["--report", "{ds}"], "is a folder"),
])
def test_an_output_that_would_destroy_an_input_is_refused_before_the_model_loads(
        dataset, tiny_args, capsys, no_model_load, outputs, words):
    (dataset / "sub").mkdir()
    before = snapshot(dataset)
    args = [value.format(ds=dataset) for value in outputs]
    assert cli.main(["batch", str(dataset), *args, *tiny_args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1
    assert snapshot(dataset) == before


def test_a_hard_link_to_a_caption_file_is_refused(dataset, tiny_args, capsys, no_model_load):
    os.link(dataset / "img_001.txt", dataset / "linked.json")
    assert cli.main(["batch", str(dataset), "--jsonl", str(dataset / "linked.json"), *tiny_args]) == 2
    assert "hard link" in capsys.readouterr().err
    assert (dataset / "img_001.txt").read_text(encoding="utf-8") == "a caption the user wrote"


def test_the_report_is_backed_up_like_every_output(captioner, dataset):
    summary = run_batch(captioner, BatchJob(inputs=[str(dataset)], report=str(dataset / "notes.txt")))
    assert (dataset / "notes.txt.bak").read_text(encoding="utf-8") == "the user's notes"
    assert json.loads((dataset / "notes.txt").read_text(encoding="utf-8"))["summary"]["captioned"] == 2
    assert str(dataset / "notes.txt.bak") in summary.backups


@pytest.mark.parametrize("webui", ["a1111"], indirect=True)
def test_the_api_refuses_such_outputs_with_a_400(client, dataset):
    response = client.post("/captioners/v1/batch", json={"inputs": [str(dataset)], "jsonl": str(dataset / "img_001.txt")})
    assert response.status_code == 400 and "is the caption file of" in response.json()["detail"]
    assert (dataset / "img_001.txt").read_text(encoding="utf-8") == "a caption the user wrote"


# ---- 5. a failure at the end keeps the summary ------------------------------------------------------
def fail_writing(monkeypatch, name: str, error: OSError) -> None:
    from captioners.batch import writing

    real = writing.atomic_write

    def write(target, data, durable=True):
        if Path(target).name == name:
            raise error
        return real(target, data, durable)

    monkeypatch.setattr(writing, "atomic_write", write)


def test_an_output_that_cannot_be_written_is_in_the_summary_and_exit_status_3(
        dataset, tiny_args, tmp_path, capsys, monkeypatch):
    fail_writing(monkeypatch, "report.json", OSError(28, "No space left on device"))
    (dataset / "broken.jpg").write_bytes(b"not a jpeg")
    code = cli.main(["batch", str(dataset), "--jsonl", str(tmp_path / "all.jsonl"), "--report",
                     str(tmp_path / "report.json"), "--quiet", *tiny_args])
    out = capsys.readouterr().out
    assert code == 3
    assert out.startswith("captioned 2, skipped 1 (caption exists), failed 1 of 4 images")
    assert "broken.jpg: not an image" in out  # the failure list is still there
    assert f"not written (1):\n  {tmp_path / 'report.json'}: cannot write it: No space left on device" in out
    assert len((tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()) == 3  # the other output is


@pytest.mark.parametrize("webui", ["a1111"], indirect=True)
def test_over_the_api_it_is_one_line_saying_what_was_written(webui, client, dataset, tmp_path, monkeypatch):
    fail_writing(monkeypatch, "all.csv", OSError(28, "No space left on device"))
    response = client.post("/captioners/v1/batch", json={"inputs": [str(dataset)], "csv": str(tmp_path / "all.csv"),
                                                        "jsonl": str(tmp_path / "all.jsonl")})
    assert response.status_code == 507, response.text
    detail = response.json()["detail"]
    assert len(detail.splitlines()) == 1 and "all.csv (cannot write it: No space left on device)" in detail
    assert detail.startswith("Captioned 2 images and wrote 3 files")  # 2 caption files and all.jsonl
    assert (tmp_path / "all.jsonl").is_file()


# ---- 6. reruns are exactly once -------------------------------------------------------------------
def separators_in(folder: Path, name: str) -> int:
    return (folder / name).read_text(encoding="utf-8").count(" | ")


@pytest.mark.parametrize("policy", ["append", "prepend"])
def test_rerunning_a_stopped_append_adds_each_caption_once(captioner, photos, tmp_path, policy):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 6)
    for image in images:
        image.with_suffix(".txt").write_text("old", encoding="utf-8")
    # Sampled without a seed, and no tag dedupe: nothing else would stop a second caption.
    job = dict(inputs=[str(folder)], existing=policy, separator=" | ", dedupe_tags=False, batch_size=2,
               decoding={"strategy": "sample"})
    seen = []
    first = run_batch(captioner, BatchJob.from_mapping(job), on_progress=seen.append,
                      should_stop=lambda: len(seen) >= 2)
    assert first.interrupted and first.captioned == 2
    second = run_batch(captioner, BatchJob.from_mapping(job))
    assert (second.captioned, second.resumed, second.interrupted) == (4, 2, False)
    assert all(separators_in(folder, image.with_suffix(".txt").name) == 1 for image in images)
    assert second.journal and Path(second.journal).name.startswith(".captioners-journal-")
    # Finished: a third run changes nothing; a new image is captioned; an emptied file is captioned again.
    copy_photos(photos, tmp_path / "more", 1)[0].rename(folder / "new.jpg")
    (folder / "img_003.txt").write_text("", encoding="utf-8")
    third = run_batch(captioner, BatchJob.from_mapping(job))
    assert (third.captioned, third.resumed) == (2, 5)
    assert all(separators_in(folder, image.with_suffix(".txt").name) <= 1 for image in images)
    # Another job (other options) is not this one: the policy applies again.
    fourth = run_batch(captioner, BatchJob.from_mapping({**job, "separator": " / "}))
    assert fourth.resumed == 0 and fourth.captioned == 7


def test_a_kill_between_writing_and_recording_counts_by_content(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 2)
    for image in images:
        image.with_suffix(".txt").write_text("old", encoding="utf-8")
    job = BatchJob(inputs=[str(folder)], existing="append", dedupe_tags=False)
    summary = run_batch(captioner, job)
    journal = Path(summary.journal)
    lines = journal.read_text(encoding="utf-8").splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [["sha256", "writing"], ["done"]] * 2
    # As if killed after the first write, before its "done" line (and the second one never started):
    journal.write_text(lines[0] + "\n", encoding="utf-8")
    second = run_batch(captioner, job)
    assert (second.resumed, second.captioned) == (1, 1)
    assert images[0].with_suffix(".txt").read_text(encoding="utf-8").count("old, ") == 1
    assert images[1].with_suffix(".txt").read_text(encoding="utf-8").count(", ") == 2  # appended twice: no record


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigkill_mid_append_then_rerun_is_exactly_once(tiny_args, photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 24)
    for image in images:
        image.with_suffix(".txt").write_text("old", encoding="utf-8")
    command = [sys.executable, "-m", "captioners", "batch", str(folder), "--existing", "append", "--no-dedupe",
               "--separator", " | ", "--strategy", "sample", "--batch-size", "1", "--workers", "1", "--quiet",
               *tiny_args]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while sum(separators_in(folder, i.with_suffix(".txt").name) for i in images) < 4:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [separators_in(folder, i.with_suffix(".txt").name) for i in images] == [1] * len(images)
    assert "done by an earlier run of this job" in result.stdout


def test_a_torn_journal_line_is_ignored(tmp_path):
    from captioners.batch.journal import PREFIX, RunJournal

    path = tmp_path / f"{PREFIX}x.jsonl"
    path.write_bytes(b'{"writing": "/a.txt", "sha256": "00"}\n{"done": "/a.tx')
    journal = RunJournal(path)
    assert journal.done == set() and journal.writing == {"/a.txt": "00"}


# ---- 7. file names and links -----------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names")
def test_newlines_and_bad_bytes_in_names_never_break_a_line(captioner, photos, tmp_path, tiny_args, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.open(photos[0]).save(folder / "two\nlines.jpg")
    Image.open(photos[1]).save(os.fsdecode(bytes(folder) + b"/caf\xe9.jpg"))
    (folder / "bad\nimage.jpg").write_bytes(b"not a jpeg")
    code = cli.main(["batch", str(folder), "--jsonl", str(tmp_path / "all.jsonl"), "--csv", str(tmp_path / "all.csv"),
                     "--kohya-json", str(tmp_path / "meta.json"), "--report", str(tmp_path / "report.json"),
                     "--quiet", *tiny_args])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"  {folder}/bad\\nimage.jpg: not an image" in out  # one line, the newline shown as \n
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_bytes().splitlines()]
    assert sorted(os.fsencode(Path(r["path"]).name) for r in records) == [b"caf\xe9.jpg", b"two\nlines.jpg"]
    assert "caf\\xe9.jpg" in (tmp_path / "all.csv").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "report.json").read_bytes())["summary"]["captioned"] == 2
    assert len(json.loads((tmp_path / "meta.json").read_bytes())) == 2

    assert cli.main(["caption", str(folder), "--quiet", *tiny_args]) == 1  # one image is broken
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{folder}/caf\\xe9.jpg\t")
    assert lines[1].startswith(f"{folder}/two\\nlines.jpg\t")
    assert captured.err.splitlines() == [f"error: {folder}/bad\\nimage.jpg: not an image Pillow can read"]


@pytest.mark.parametrize("policy", ["skip", "overwrite", "append"])
def test_a_caption_link_out_of_the_dataset_is_never_followed(captioner, photos, tmp_path, policy):
    folder, secret = tmp_path / "set", tmp_path / "elsewhere" / "secret.txt"
    images = copy_photos(photos, folder, 2)
    secret.parent.mkdir()
    secret.write_text("outside the dataset", encoding="utf-8")
    images[0].with_suffix(".txt").symlink_to(secret)
    before = snapshot(secret.parent)
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing=policy, jsonl=str(tmp_path / "all.jsonl")))
    assert snapshot(secret.parent) == before  # not read into a caption, not written, no backup beside it
    assert [Path(p).name for p, _ in summary.failed] == [images[0].name]
    assert "is a symbolic link to" in summary.failed[0][1] and "never followed" in summary.failed[0][1]
    assert images[0].with_suffix(".txt").is_symlink() and summary.captioned == 1
    assert "outside the dataset" not in (tmp_path / "all.jsonl").read_text(encoding="utf-8")


def test_a_caption_link_inside_the_dataset_writes_its_target(captioner, photos, tmp_path):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 1)
    (folder / "captions").mkdir()
    (folder / "captions" / "img_000.txt").write_text("old", encoding="utf-8")
    images[0].with_suffix(".txt").symlink_to(folder / "captions" / "img_000.txt")
    summary = run_batch(captioner, BatchJob(inputs=[str(folder)], existing="append", dedupe_tags=False))
    assert summary.captioned == 1 and images[0].with_suffix(".txt").is_symlink()
    assert (folder / "captions" / "img_000.txt").read_text(encoding="utf-8").startswith("old, ")


def test_a_link_that_appears_after_planning_is_not_followed(captioner, photos, tmp_path):
    from captioners.batch.runner import plan_job

    folder, secret = tmp_path / "set", tmp_path / "secret.txt"
    images = copy_photos(photos, folder, 1)
    secret.write_text("outside", encoding="utf-8")
    job = BatchJob(inputs=[str(folder)], existing="append")
    plan = plan_job(job)
    images[0].with_suffix(".txt").symlink_to(secret)  # between planning and writing
    summary = run_batch(captioner, job, plan=plan)
    assert secret.read_text(encoding="utf-8") == "outside" and summary.captioned == 0
    assert "symbolic link" in summary.failed[0][1]
    with pytest.raises(CaptionerError):
        plan_job(BatchJob(inputs=[str(folder / "missing")]))
