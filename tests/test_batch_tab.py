"""The Batch tab as a user sees it: the progress line once a batch ends, the latest captions, failures
named by file, an empty input field."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from captioners.batch.report import BatchSummary, Progress
from captioners.service import CaptionService, Host, Settings
from captioners.ui import render
from captioners.ui.batch_tab import NO_INPUTS, batch_updates, start_batch
from tests.batch_helpers import copy_photos
from tests.webui_host import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def service(tiny_models_dir):
    settings = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu")
    return CaptionService(Host(lambda: settings))


def fields(inputs: str, batch_size: int = 4) -> list:
    """The Batch tab's controls, in start_batch's order, with their default values."""
    shaping = [inputs, False, "", ".txt", "skip", True, batch_size, False, "", "", "", "prepend", "", "", False, False,
               False, ""]
    judging = [False, "", "keep", 75, 0, False, ""]
    return [*shaping, *judging, *([None] * 17)]


def ended_handle(interrupted: bool) -> SimpleNamespace:
    done = threading.Event()
    done.set()
    progress = Progress(8, 20, 8, 0, 0, 12.0, 0.67, 18.0, [("/d/img_007.jpg", "a dog")])
    summary = BatchSummary(captioned=8, interrupted=interrupted, total=20, elapsed_s=12.0, images_per_s=0.67)
    return SimpleNamespace(done=done, error=None, progress=progress, summary=summary,
                           latest=[("/d/img_007.jpg", "a dog")])


def test_an_ended_batch_shows_no_eta():
    """An interrupted batch kept showing its last "ETA 0:18" under its summary."""
    interrupted = batch_updates(ended_handle(True), TINY)[0]
    assert "ETA" not in interrupted and "Interrupted at 8/20" in interrupted
    running = render.progress_line(ended_handle(True).progress, TINY)
    assert "ETA 0:18" in running
    finished = ended_handle(False)
    finished.progress.done = finished.progress.total = 8
    assert "Finished: 8/8" in batch_updates(finished, TINY)[0]


def test_the_preview_shows_the_latest_captions(service, photos, tmp_path):
    """It showed the first 8 captions of the run; a user watches the latest ones."""
    folder = tmp_path / "ds"
    copy_photos(photos, folder, 12)
    updates = list(start_batch(service, TINY, *fields(str(folder), batch_size=4)))
    progress, previews, failures, summary, _, _ = updates[-1]
    assert "Finished: 12/12" in progress and "Batch finished" in summary and "No failures." in failures
    shown = [name for name in (f"img_{i:03d}.jpg" for i in range(12)) if name in previews]
    assert shown == [f"img_{i:03d}.jpg" for i in range(4, 12)]
    assert "latest captions" in previews


def test_long_paths_do_not_squeeze_the_captions():
    """In the automatic table layout a long unbroken path took nearly all the width."""
    html = render.pairs_table([("/" + "very-long-folder-name/" * 12 + "img.jpg", "a caption")], ("image", "caption"),
                              "none")
    assert "captioners-pairs" in html
    css = (ROOT / "style.css").read_text()
    assert ".captioners-pairs { table-layout: fixed; }" in css and ".captioners-pairs th:first-child" in css


def test_a_bad_image_is_named_by_its_file(service, photos, tmp_path):
    folder = tmp_path / "ds"
    copy_photos(photos, folder, 1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    failures = list(start_batch(service, TINY, *fields(str(folder))))[-1][2]
    assert "broken.png" in failures and "BytesIO" not in failures


@pytest.mark.parametrize("inputs", ["", "  \n "])
def test_an_empty_input_field_says_what_to_enter(service, inputs):
    """It said "No images found in no inputs", then "name ... a file list" (a command-line input)."""
    progress, previews, failures, summary, report, notice = list(start_batch(service, TINY, *fields(inputs)))[-1]
    assert progress == render.error_html(NO_INPUTS) and "Input folders or images" in NO_INPUTS
    assert "file list" not in progress
