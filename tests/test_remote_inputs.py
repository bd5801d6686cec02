"""Inputs named by a URI (object storage through pyarrow filesystems), with no network: ``file://``
URIs, and made-up schemes put in ``remote.SCHEMES`` (a sub-tree of a local folder, which travels to
Ray's workers, and an fsspec memory filesystem for the local engine). Both engines read them; the
captions go to --output-dir, exactly as a local run of the same folder writes them there.

Like tests/test_ray_engine.py, these run with current releases only (pyarrow comes with the [ray] extra).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from captioners import cli
from captioners.batch import remote
from tests.batch_helpers import copy_photos, model_args

if os.environ.get("CAPTIONERS_PIN_SET", "current") != "current":
    pytest.skip("URI inputs are tested with current releases", allow_module_level=True)
pafs = pytest.importorskip("pyarrow.fs", reason="URI inputs need pyarrow (the [ray] extra)")


@pytest.fixture(scope="module")
def tiny_args(icg_checkpoint, tiny_clip, tokenizer_dir, tmp_path_factory) -> list[str]:
    return model_args(icg_checkpoint.path, tiny_clip, tokenizer_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(capsys, *args: str) -> tuple[int, dict]:
    code = cli.main(["batch", *args, "--json", "--quiet"])
    return code, json.loads(capsys.readouterr().out)


def dataset(photos: list[Path], folder: Path) -> Path:
    """Five photos (one in a sub-folder), a damaged JPEG, a hidden folder and a note: what a bucket holds."""
    images = copy_photos(photos, folder, 5)
    (folder / "sub").mkdir()
    images[0].rename(folder / "sub" / images[0].name)
    (folder / "damaged.jpg").write_bytes(b"not a JPEG at all")
    (folder / ".cache").mkdir()
    shutil.copy(images[1], folder / ".cache" / "thumb.jpg")
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    return folder


def outputs(folder: Path) -> dict[str, bytes]:
    """The caption files under ``folder``, its run journal and result table aside."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.txt"))
            if not any(part.startswith(".captioners-") for part in p.relative_to(folder).parts)}


def table_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for shard in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def reference(capsys, photos: list[Path], tmp_path: Path, tiny_args: list[str]) -> dict[str, bytes]:
    """The local engine on the same images as a local folder, captions in an output folder."""
    folder = dataset(photos, tmp_path / "local" / "set")
    code, summary = run(capsys, str(folder), "-r", "--batch-size", "3", "--output-dir", str(tmp_path / "local" / "out"),
                        *tiny_args)
    assert code == 0 and summary["captioned"] == 5, summary
    return outputs(tmp_path / "local" / "out")


def test_ray_on_a_file_uri_writes_what_the_local_engine_writes_and_resumes(cluster, tiny_args, photos, tmp_path,
                                                                           capsys):
    expected = reference(capsys, photos, tmp_path, tiny_args)
    folder = dataset(photos, tmp_path / "bucket" / "set")
    out, table = tmp_path / "out", tmp_path / "table"
    args = [folder.as_uri() + "/", "-r", "--batch-size", "3", "--engine", "ray", "--output-dir", str(out),
            "--table-dir", str(table), *tiny_args]
    code, summary = run(capsys, *args)
    assert code == 0, summary
    assert outputs(out) == expected and len(expected) == 5
    assert [(Path(path).name, reason) for path, reason in summary["failed"]] == [
        ("damaged.jpg", "the object is not an image Pillow can read (not a known image format, or damaged).")]
    assert summary["failed"][0][0] == folder.as_uri() + "/damaged.jpg"  # named by its URI
    rows = table_rows(table)
    ids = sorted(row["id"] for row in rows)  # the path below the URI's prefix
    assert ids == sorted(["damaged.jpg", "sub/img_000.jpg"] + [f"img_00{i}.jpg" for i in range(1, 5)])
    assert all(row["path"].startswith("file://") for row in rows)

    (out / "sub" / "img_000.txt").unlink()  # a rerun writes it again from the table, no model run
    code, summary = run(capsys, *args)
    assert code == 0 and summary["captioned"] == 1 and summary["skipped"] == 4
    again = table_rows(table)
    assert outputs(out) == expected
    # Only the damaged image was tried again (one new row); every id is the same as in the first run.
    assert len(again) == len(rows) + 1 and sorted({row["id"] for row in again}) == ids


def test_ray_reads_a_non_local_scheme_in_its_tasks_and_a_vanished_object_is_a_failure(
        cluster, tiny_args, photos, tmp_path, capsys, monkeypatch):
    expected = reference(capsys, photos, tmp_path, tiny_args)
    folder = dataset(photos, tmp_path / "store" / "photos" / "set")
    copy_photos(photos, tmp_path / "gone", 1)[0].rename(folder / "gone.jpg")
    # bucket://photos/set is the folder store/photos/set; the filesystem is pickled to the workers.
    monkeypatch.setitem(remote.SCHEMES, "bucket", lambda uri: (pafs.SubTreeFileSystem(str(tmp_path / "store"),
                                                                                       pafs.LocalFileSystem()),
                                                                 uri.removeprefix("bucket://")))
    listed = remote.find_remote

    def list_then_delete(uri: str, recursive: bool):  # deleted between listing and reading
        files = list(listed(uri, recursive))
        (folder / "gone.jpg").unlink()
        return iter(files)

    monkeypatch.setattr("captioners.batch.discovery.find_remote", list_then_delete)
    code, summary = run(capsys, "bucket://photos/set", "-r", "--batch-size", "3", "--engine", "ray",
                        "--output-dir", str(tmp_path / "out"), *tiny_args)
    assert code == 0, summary
    assert outputs(tmp_path / "out") == expected
    failed = dict(summary["failed"])
    assert set(failed) == {"bucket://photos/set/damaged.jpg", "bucket://photos/set/gone.jpg"}
    assert failed["bucket://photos/set/gone.jpg"].startswith("cannot read it: ")


def test_the_local_engine_reads_an_fsspec_filesystem(tiny_args, photos, tmp_path, capsys, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    expected = reference(capsys, photos, tmp_path, tiny_args)
    memory = fsspec.filesystem("memory")
    folder = dataset(photos, tmp_path / "source")
    for path in folder.rglob("*"):
        if path.is_file():
            memory.pipe(f"/bucket/set/{path.relative_to(folder).as_posix()}", path.read_bytes())
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    monkeypatch.setitem(remote.SCHEMES, "mem", lambda uri: (filesystem, "/" + uri.removeprefix("mem://")))
    try:
        code, summary = run(capsys, "mem://bucket/set", "-r", "--batch-size", "3", "--output-dir",
                            str(tmp_path / "out"), "--jsonl", str(tmp_path / "all.jsonl"), *tiny_args)
    finally:
        memory.rm("/bucket", recursive=True)
    assert code == 0, summary
    assert outputs(tmp_path / "out") == expected
    assert [Path(path).name for path, _ in summary["failed"]] == ["damaged.jpg"]
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(line["path"] for line in lines)[0] == "mem://bucket/set/img_001.jpg"


@pytest.mark.parametrize("engine", ["local", "ray"])
@pytest.mark.parametrize("case", ["no output dir", "unknown scheme", "missing prefix"])
def test_bad_uri_inputs_are_one_line_and_exit_status_2(case, engine, tiny_args, tmp_path, capsys):
    uri = {"no output dir": tmp_path.as_uri(), "unknown scheme": "nosuchscheme://bucket/set",
           "missing prefix": (tmp_path / "nothing").as_uri()}[case]
    out = [] if case == "no output dir" else ["--output-dir", str(tmp_path / "out")]
    code = cli.main(["batch", uri, "--engine", engine, *out, *tiny_args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: Input {uri}") and "Traceback" not in err
    assert {"no output dir": "--output-dir", "unknown scheme": "not a URI pyarrow can open",
            "missing prefix": "does not exist"}[case] in err


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_file_list_names_objects_and_local_images_alike(engine, request, tiny_args, photos, tmp_path, capsys):
    """A --file-list line may be a URI: its image is read from the object, its caption goes to
    --output-dir as a local line's would, in the list's order; the same files as a list of paths."""
    if engine == "ray":
        request.getfixturevalue("cluster")
    images = copy_photos(photos, tmp_path / "set", 3)
    local_list = tmp_path / "local.txt"
    local_list.write_text("\n".join(str(p) for p in images) + "\n", encoding="utf-8")
    code, summary = run(capsys, "--file-list", str(local_list), "--output-dir", str(tmp_path / "expected"), *tiny_args)
    assert code == 0 and summary["captioned"] == 3, summary
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"# two objects and a local image\n{images[0].as_uri()}\n{images[1]}\n{images[2].as_uri()}\n",
                     encoding="utf-8")
    code, summary = run(capsys, "--file-list", str(mixed), "--output-dir", str(tmp_path / "out"),
                        "--engine", engine, "--batch-size", "2", "--jsonl", str(tmp_path / "all.jsonl"), *tiny_args)
    assert code == 0 and summary["captioned"] == 3 and not summary["failed"], summary
    assert outputs(tmp_path / "out") == outputs(tmp_path / "expected")
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(line["path"] for line in lines) == sorted([images[0].as_uri(), str(images[1]), images[2].as_uri()])


def test_a_uri_in_a_file_list_needs_an_output_dir(tiny_args, photos, tmp_path, capsys):
    image = copy_photos(photos, tmp_path / "set", 1)[0]
    listed = tmp_path / "list.txt"
    listed.write_text(image.as_uri() + "\n", encoding="utf-8")
    code = cli.main(["batch", "--file-list", str(listed), *tiny_args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "(in the file list)" in err and "--output-dir" in err
    assert not list((tmp_path / "set").glob("*.txt"))


def test_the_objects_of_a_file_list_open_their_bucket_once(monkeypatch):
    opened: list[str] = []
    filesystem = object()

    def resolve(uri: str):
        opened.append(uri)
        return filesystem, uri.removeprefix("fake://").partition("?")[0]

    monkeypatch.setitem(remote.SCHEMES, "fake", resolve)
    uris = ["fake://b1/set/a.jpg", "fake://b1/set/sub/b.jpg", "fake://b2/c.png", "fake://b1/d.jpg?version=2"]
    files = list(remote.listed_remote_files(uris))
    assert opened == ["fake://b1/set/a.jpg", "fake://b2/c.png", "fake://b1/d.jpg?version=2"]  # per bucket (and query)
    assert [(f.uri, f.path, f.relative) for f in files] == [
        ("fake://b1/set/a.jpg", "b1/set/a.jpg", "a.jpg"), ("fake://b1/set/sub/b.jpg", "b1/set/sub/b.jpg", "b.jpg"),
        ("fake://b2/c.png", "b2/c.png", "c.png"), ("fake://b1/d.jpg", "b1/d.jpg", "d.jpg")]
    assert all(f.filesystem is filesystem for f in files)
