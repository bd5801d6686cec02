"""The Ray engine (batch --engine ray) on a local two-CPU cluster: the same caption files as the local
engine, failures as rows, and every image captioned exactly once when the driver or a worker is killed.

Ray is an optional extra; these tests run where it is installed, with current releases (tools/test.sh
sets CAPTIONERS_PIN_SET for the WebUI pin sets, whose hosts never run Ray).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from captioners import cli
from tests.batch_corpus import make_corpus
from tests.batch_helpers import copy_photos, model_args, snapshot

if os.environ.get("CAPTIONERS_PIN_SET", "current") != "current":
    pytest.skip("the Ray engine is tested with current releases", allow_module_level=True)
ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
       "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: every run joins it (a start costs seconds)."""
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)  # its DEBUG statistics would flood failure reports
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_args(icg_checkpoint, tiny_clip, tokenizer_dir, tmp_path_factory) -> list[str]:
    return model_args(icg_checkpoint.path, tiny_clip, tokenizer_dir, tmp_path_factory.mktemp("models"))


def run(capsys, *args: str) -> tuple[int, dict]:
    code = cli.main(["batch", *args, "--json", "--quiet"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def caption_files(folder: Path) -> dict[str, bytes]:
    """Every file the run left (its own journal and table aside), paths in them relative to ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes().replace(str(folder).encode(), b"")
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part.startswith(".captioners-") for part in p.relative_to(folder).parts)}


def table_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for shard in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(shard).to_pylist()]


CASES = {
    "skip": [],
    "overwrite": ["--existing", "overwrite"],
    "append with text shaping": ["--existing", "append", "--trigger", "sks", "--lowercase", "--strip-period",
                                 "--exclude", "a"],
    "output dir and two captions": ["--output-dir", "{out}", "--captions-per-image", "2", "--num-beams", "3",
                                    "--strategy", "beam"],
    "dry run": ["--dry-run", "--existing", "prepend"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_ray_and_local_engines_write_the_same_files(case, cluster, tiny_args, photos, tmp_path, capsys):
    folders = {}
    for engine in ("local", "ray"):
        folder = tmp_path / engine / "set"
        images = copy_photos(photos, folder, 7)
        (folder / "sub").mkdir()
        images[0].rename(folder / "sub" / images[0].name)
        (folder / "img_001.txt").write_text("old caption, a tag", encoding="utf-8")
        options = [part.replace("{out}", str(tmp_path / engine / "out")) for part in CASES[case]]
        code, summary = run(capsys, str(folder), "-r", "--batch-size", "3", "--engine", engine, *options,
                            "--jsonl", str(tmp_path / engine / "all.jsonl"), *tiny_args)
        assert code == 0, summary
        folders[engine] = summary
    local, distributed = (caption_files(tmp_path / engine) for engine in ("local", "ray"))
    assert local == distributed
    assert len(local) > 7
    for field in ("captioned", "skipped", "failed", "total", "changes"):  # Ray's batches finish in any order
        shown = [sorted(json.dumps(item).replace(str(tmp_path / engine), "") for item in folders[engine][field])
                 if isinstance(folders[engine][field], list) else folders[engine][field] for engine in ("local", "ray")]
        assert shown[0] == shown[1], field


def test_bad_images_are_failures_and_the_table_is_complete(cluster, tiny_args, photos, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "odd", photos)
    table = tmp_path / "table"
    code, summary = run(capsys, str(corpus.root), "-r", "--batch-size", "4", "--engine", "ray", "--table-dir",
                        str(table), *tiny_args)
    assert code == 0
    failed = {Path(path).name for path, _ in summary["failed"]}
    assert failed and failed == {p.name for p in corpus.failing}
    rows = table_rows(table)
    ids = [row["id"] for row in rows]
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert len(ids) == len(set(ids)) == summary["captioned"] + len(errors)  # a row for every image it ran on
    # Only a caption-file clash fails before the run (no row); every unreadable file is a row with its reason.
    assert failed - set(errors) == {"same_name.png"} and all(errors.values())
    good = [row for row in rows if not row["error"]]
    assert all(row["caption"] and row["captions"] == [row["caption"]] and row["model"] for row in good)
    assert len({row["options_hash"] for row in rows}) == 1


def test_jsonl_table_and_a_rerun_that_only_writes(cluster, tiny_args, photos, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 5)
    table = tmp_path / "table"
    # Relative paths, from a folder that is not the workers' current one (they started elsewhere).
    monkeypatch.chdir(tmp_path)
    args = ["set", "--engine", "ray", "--table-dir", "table", "--table-format", "jsonl", *tiny_args]
    assert run(capsys, *args, "--dry-run")[0] == 0
    assert not table.exists()  # a dry run writes nothing, not even the table
    assert run(capsys, *args)[0] == 0
    rows = [json.loads(line) for shard in table.glob("part-*.jsonl") for line in shard.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(p.name for p in folder.glob("*.jpg"))
    for caption in folder.glob("*.txt"):  # lost captions are written again from the table, no model run
        caption.unlink()
    code, summary = run(capsys, *args)
    assert code == 0 and summary["captioned"] == 5
    assert sum(1 for shard in table.glob("part-*.jsonl") for _ in shard.read_text().splitlines()) == 5  # no new row


def wait_for_shards(table: Path, count: int, process: subprocess.Popen | None = None, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while len(list(table.glob("part-*.parquet"))) < count:
        if process is not None:
            assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the Ray run made no progress"
        time.sleep(0.05)


@pytest.mark.skipif(os.name != "posix", reason="POSIX process groups")
def test_a_killed_driver_reruns_to_every_image_captioned_once(cluster, tiny_args, photos, tmp_path, capsys):
    folder, table = tmp_path / "set", tmp_path / "table"
    images = copy_photos(photos, folder, 24)
    command = [sys.executable, "-m", "captioners", "batch", str(folder), "--engine", "ray", "--batch-size", "2",
               "--table-dir", str(table), "--existing", "append", "--quiet", *tiny_args]
    # Its own local cluster, in its own process group: the kill takes the whole cluster down with it.
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        wait_for_shards(table, 1, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert len(table_rows(table)) < len(images)
    code, summary = run(capsys, *command[4:])
    assert code == 0, summary
    rows = table_rows(table)
    assert sorted(row["id"] for row in rows) == sorted(p.name for p in images)  # one row per image
    captions = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert len(captions) == len(images)
    assert all(text.count(", ") == 0 and "\n" not in text for text in captions.values())  # appended once
    by_name = {Path(row["path"]).stem + ".txt": row["caption"] for row in rows}
    assert captions == by_name


def caption_worker_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"CaptionWorker" in title and b"ray::" in title:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc")
def test_a_killed_worker_is_restarted_and_every_image_is_captioned_once(cluster, tiny_args, photos, tmp_path,
                                                                        capsys):
    folder, table = tmp_path / "set", tmp_path / "table"
    images = copy_photos(photos, folder, 24)
    before = snapshot(folder)
    killed: list[int] = []

    def kill_a_worker() -> None:  # the run itself stays in the main thread, where its signal handlers go
        wait_for_shards(table, 1)
        pids = caption_worker_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    code = cli.main(["batch", str(folder), "--engine", "ray", "--batch-size", "2", "--table-dir", str(table),
                     "--quiet", "--json", *tiny_args])
    killer.join(timeout=5)
    assert killed, "no captioning worker process was found and killed"
    assert code == 0
    out = capsys.readouterr().out  # Ray's own notes of the retried batch may come first
    summary = json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)
    assert summary["captioned"] == len(images) and not summary["failed"]
    rows = table_rows(table)
    assert sorted(row["id"] for row in rows) == sorted(p.name for p in images)
    assert all(before[name] == snapshot(folder)[name] for name in before)  # the images untouched
    assert len(list(folder.glob("*.txt"))) == len(images)


def test_workers_are_refused_the_cpus_a_fixed_cluster_lacks(caplog):
    """Actors keep their CPUs for the whole job. CPU workers read their own images and may take every
    CPU; GPU workers must leave one for the preprocessing tasks that feed them, or those never run."""
    from captioners.batch.ray_engine import RayEngine, RaySettings
    from captioners.batch.steps import ModelRequest
    from captioners.errors import CaptionerError

    class TwoCpus:
        @staticmethod
        def cluster_resources() -> dict:
            return {"CPU": 2.0, "GPU": 2.0}

    def check(workers: int, cpus: float, gpus: float, fixed_size: bool = True) -> None:
        engine = RayEngine(RaySettings(workers=workers, cpus_per_worker=cpus), ModelRequest(("m",), "/models"))
        engine._check_room(TwoCpus, fixed_size=fixed_size, gpus_per_worker=gpus)

    check(2, 1.0, gpus=0)  # CPU workers on every CPU: they read their own images
    with pytest.raises(CaptionerError, match="more CPUs than it has"):
        check(3, 1.0, gpus=0)
    with pytest.raises(CaptionerError, match="no CPU for reading images.*--cpus-per-worker"):
        check(2, 1.0, gpus=1)
    check(2, 1.0, gpus=1, fixed_size=False)
    assert "unless the cluster adds nodes" in caplog.text  # a cluster that can grow: a warning only
    check(2, 0.5, gpus=1)


def test_cpu_workers_read_their_own_images_and_gpu_workers_are_fed_by_tasks(monkeypatch):
    """The plan Ray Data is given: one actor stage for CPU workers, CPU tasks then actors for GPU workers."""
    from captioners.batch import ray_engine

    stages: list[tuple[str, dict]] = []

    class Dataset:
        def map_batches(self, fn, **kwargs):
            stages.append((getattr(fn, "__name__", str(fn)), kwargs))
            return self

        def iter_batches(self, **kwargs):
            return iter(())

    class FakeRay:
        data = type("data", (), {"from_items": staticmethod(lambda records, **k: Dataset()),
                                 "ActorPoolStrategy": staticmethod(lambda size: ("pool", size)),
                                 "DataContext": type("DataContext", (), {"get_current": staticmethod(
                                     lambda: type("Context", (), {})())})})

        def __init__(self, gpus: float):
            self.gpus = gpus

        def cluster_resources(self) -> dict:
            return {"CPU": 4.0, "GPU": self.gpus}

    monkeypatch.setattr(ray_engine, "driver_preprocessing", lambda captioners, job: ("step", 1))
    item = ray_engine.Planned(0, Path("/set/a.jpg"), Path("/set/a.txt"), "a.jpg")
    for gpus, expected in ((0, ["CaptionWorker"]), (1, ["preprocess_batch", "CaptionWorker"])):
        stages.clear()
        engine = ray_engine.RayEngine(ray_engine.RaySettings(), ray_engine.ModelRequest(("m",), "/models"))
        list(engine._rows(FakeRay(gpus), [item], [], ray_engine.BatchJob(inputs=["/set"]), "m", "k", gpus))
        assert [name for name, _ in stages] == expected
        reading = stages[-1][1]["fn_constructor_kwargs"]["reading"]
        assert (reading is not None) == (gpus == 0)
        assert stages[-1][1]["num_gpus"] == gpus


def test_a_table_folder_that_cannot_be_written_stops_before_any_captioning(tiny_args, photos, tmp_path, capsys):
    folder = tmp_path / "set"
    copy_photos(photos, folder, 2)
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    code = cli.main(["batch", str(folder), "--engine", "ray", "--table-dir", str(blocked / "table"), *tiny_args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Cannot write the result table" in err and "--table-dir" in err and "Traceback" not in err
    assert not list(folder.glob("*.txt"))


def test_a_worker_gets_the_same_inputs_whether_it_reads_its_images_or_is_fed(photos):
    """CPU workers preprocess in the actor; GPU workers get the tensors as bytes from CPU tasks: the
    captioning step sees the same ids, paths, pixels and errors either way."""
    import pyarrow as pa
    import torch

    from captioners.batch import ray_engine

    def step(path):
        return "cannot read it: broken" if path.endswith("bad.jpg") else (torch.full((3, 2, 2), float(len(path))),
                                                                           torch.ones(4, dtype=torch.float16))

    seen = []

    class Step:
        def rows(self, ids, paths, pixels, errors):
            seen.append((ids, paths, pixels, errors))
            return []

    batch = pa.table({"id": ["a", "b"], "path": ["/set/a.jpg", "/set/bad.jpg"], "filesystem": [-1, -1],
                      "object": ["", ""]})
    for reading in ({"step": step, "filesystems": []}, None):
        worker = ray_engine.CaptionWorker.__new__(ray_engine.CaptionWorker)
        worker.step, worker.slots, worker.reading = Step(), 2, reading
        worker(batch if reading else ray_engine.preprocess_batch(batch, step, 2))
    (ids, paths, own, errors), (*fed_rest, fed, fed_errors) = seen
    assert ids == ["a", "b"] and paths == ["/set/a.jpg", "/set/bad.jpg"] and fed_rest == [ids, paths]
    assert errors == fed_errors == [None, "cannot read it: broken"]
    assert all(torch.equal(x, y) and x.dtype == y.dtype == torch.float32 for x, y in zip(own, fed))
