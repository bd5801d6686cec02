"""``python -m captioners batch``: odd corpus, unreadable files, read-only output, kill and resume."""

from __future__ import annotations

import ctypes
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
from captioners.batch.shaping import one_line
from captioners.images import load_image
from tests.batch_corpus import make_corpus
from tests.batch_helpers import copy_photos, model_args, snapshot, temp_files

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8",
       "OMP_NUM_THREADS": "1"}  # as in conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def tiny_args(icg_checkpoint, tiny_clip, tokenizer_dir, tmp_path_factory) -> list[str]:
    return model_args(icg_checkpoint.path, tiny_clip, tokenizer_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def captioner(load_tiny, icg_checkpoint):
    return load_tiny(icg_checkpoint.path)


def _drop_dac_override() -> None:
    """Root reads and writes anything; without CAP_DAC_OVERRIDE file modes apply to it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def file_modes_apply_kwargs() -> dict:
    """Popen arguments under which chmod'ed files are unreadable / unwritable, whoever runs the tests."""
    if os.name != "posix":
        pytest.skip("file modes are a POSIX test")
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_override, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE, so file modes cannot be tested")
    return {"preexec_fn": _drop_dac_override}


# One interpreter runs several command lines (each start imports torch: seconds on a busy machine).
DRIVER = ("import json, sys\nfrom captioners.cli import main\n"
          "for args in json.loads(sys.argv[1]):\n    print('exit status', main(['batch', *args]), flush=True)")


def batch_cli_runs(*runs: list[str], **kwargs) -> list[tuple[int, str]]:
    """(exit status, stdout) of ``python -m captioners batch ARGS`` for each run, in one process."""
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(runs))], capture_output=True,
                            text=True, cwd=ROOT, env=ENV, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr
    outputs, current = [], []
    for line in result.stdout.splitlines():
        if line.startswith("exit status "):
            outputs.append((int(line.split()[-1]), "\n".join(current)))
            current = []
        else:
            current.append(line)
    assert len(outputs) == len(runs), result.stdout + result.stderr
    return outputs


def test_odd_corpus_unreadable_file_and_read_only_output_folder(tiny_args, photos, tmp_path):
    corpus = make_corpus(tmp_path / "dataset")
    locked = corpus.root / "sub" / "locked"
    copy_photos(photos, locked, 1)
    copy_photos(photos, tmp_path / "in", 3)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    locked.chmod(0)
    try:
        (code, out), (ro_code, ro_out) = batch_cli_runs(
            [str(corpus.root), "-r", "--batch-size", "4", "--report", str(tmp_path / "report.json"), *tiny_args],
            [str(tmp_path / "in"), "--output-dir", str(read_only), *tiny_args],
            **file_modes_apply_kwargs())
    finally:
        read_only.chmod(0o755)
        locked.chmod(0o755)

    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    failed = dict(map(tuple, report["summary"]["failed"]))
    assert "permission denied" in failed.pop(str(corpus.unreadable))
    assert failed.pop(str(locked)) == "folder not readable: Permission denied"
    assert {Path(p) for p in failed} == set(corpus.failing)
    assert report["summary"]["captioned"] == len(corpus.captioned)
    assert all(image.with_suffix(".txt").read_text(encoding="utf-8") for image in corpus.captioned)
    first = out.splitlines()[0]
    assert first.startswith(f"captioned {len(corpus.captioned)}, skipped 0 (caption exists), "
                            f"failed {len(corpus.failing) + 2} of") and "images/s" in first
    assert f"{corpus.unreadable}: permission denied" in out
    assert "unicode café 日本語 🐱.jpg" not in out and "notes.md" not in out

    assert ro_code == 1, ro_out  # every image failed
    assert "captioned 0, skipped 0 (caption exists), failed 3 of 3" in ro_out
    assert ro_out.count("Permission denied") == 3 and not list(read_only.iterdir())


# ---- interrupt and resume -------------------------------------------------------------------------
def captions_in(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}


def wait_for_captions(process: subprocess.Popen, folder: Path, count: int) -> None:
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*.txt"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the batch run made no progress"
        time.sleep(0.005)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals and process groups")
def test_killed_and_interrupted_runs_resume_to_every_image_captioned_once(tiny_args, captioner, photos, tmp_path,
                                                                         capsys):
    folder = tmp_path / "set"
    images = copy_photos(photos, folder, 60)
    expected = {}
    for start in range(0, len(images), 24):
        chunk = images[start:start + 24]
        for image, caption in zip(chunk, captioner.caption([load_image(p) for p in chunk])):
            expected[image.with_suffix(".txt").name] = one_line(caption)
    command = [sys.executable, "-m", "captioners", "batch", str(folder), "--batch-size", "1", "--json", *tiny_args]

    # 1. SIGKILL mid-run: whatever files exist are whole captions.
    process = subprocess.Popen(command + ["--workers", "1"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_captions(process, folder, 3)
    process.kill()
    process.communicate()
    after_kill = captions_in(folder)
    assert 0 < len(after_kill) < len(images)
    assert all(expected[name] == text for name, text in after_kill.items())

    # 2. Ctrl-C to the whole process group (decoding workers are processes): stops after the batch.
    process = subprocess.Popen(command + ["--loader", "processes", "--workers", "2"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_captions(process, folder, len(after_kill) + 3)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    summary = json.loads(out)
    after_interrupt = captions_in(folder)
    assert summary["interrupted"] and summary["skipped"] == len(after_kill)
    assert summary["captioned"] == len(after_interrupt) - len(after_kill) < len(images) - len(after_kill)
    assert all(expected[name] == text for name, text in after_interrupt.items())

    # 3. Rerun with skip (the default; in this process to save a start): finishes the rest, touches nothing else.
    before = snapshot(folder)
    code = cli.main(command[3:] + ["--jsonl", str(tmp_path / "all.jsonl")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["captioned"], summary["skipped"], summary["failed"]) == (
        len(images) - len(after_interrupt), len(after_interrupt), [])
    assert captions_in(folder) == expected
    assert all(snapshot(folder)[name] == state for name, state in before.items() if name.endswith(".txt"))
    assert not temp_files(folder) and not list(folder.glob("*.bak*"))
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(p.name for p in images)


@pytest.mark.skipif(os.name != "posix", reason="on Windows os.kill terminates the process")
def test_first_signal_asks_to_stop_a_second_ctrl_c_stops_at_once():
    from captioners.cli.batch import StopOnSignal

    previous = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is previous


# ---- in-process command line -------------------------------------------------------------------------
def test_cli_dry_run_prints_changes_and_writes_nothing(tiny_args, photos, tmp_path, capsys):
    images = copy_photos(photos, tmp_path / "set", 3)
    images[0].with_suffix(".txt").write_text("1girl, smile")
    before = snapshot(tmp_path)
    code = cli.main(["batch", str(tmp_path / "set"), "--dry-run", "--existing", "append", "--trigger", "sks",
                     "--jsonl", str(tmp_path / "x.jsonl"), "--quiet", *tiny_args])
    out = capsys.readouterr().out
    assert code == 0 and snapshot(tmp_path) == before
    assert out.startswith("would caption 3, skipped 0 (caption exists), failed 0 of 3 images")
    assert "dry run, nothing written; would append 1, create 2" in out
    assert f"append    {images[0].with_suffix('.txt')}: 1girl, smile, sks, " in out


def test_cli_exit_status_when_the_run_cannot_start_or_every_image_fails(tiny_args, tmp_path, capsys):
    assert cli.main(["batch", str(tmp_path / "missing"), *tiny_args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["batch", str(tmp_path), "--extension", ".jpg", *tiny_args]) == 2
    assert "image extension" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("existing")
    assert cli.main(["batch", str(tmp_path), "--quiet", *tiny_args]) == 0  # one skipped, one failed
    (tmp_path / "good.png").unlink()
    assert cli.main(["batch", str(tmp_path), "--quiet", *tiny_args]) == 1
    assert "bad.jpg: not an image Pillow can read" in capsys.readouterr().out
