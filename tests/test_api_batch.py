"""REST API batch routes (the batch engine of issue 4 behind POST /captioners/v1/batch and interrupt)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.webui_host import TINY

pytestmark = pytest.mark.parametrize("webui", ["a1111"], indirect=True)


def test_batch_with_a_missing_folder_is_404(client, tmp_path):
    response = client.post("/captioners/v1/batch", json={"inputs": [str(tmp_path / "nowhere")]})
    assert response.status_code == 404 and "not found" in response.json()["detail"]


def photo_folder(folder: Path, photos, count: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos[:count]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    return folder


def small_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 40), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(folder / f"{i:04d}.png")
    return folder


def test_batch_captions_a_folder_as_a_webui_job(webui, client, photos, tmp_path):
    folder = photo_folder(tmp_path / "set", photos, 5)
    lock, state = webui.call_queue.queue_lock, webui.shared.state
    before = lock.acquisitions
    response = client.post("/captioners/v1/batch", json={
        "inputs": [str(folder)], "batch_size": 2, "shaping": {"trigger": "sks"}, "decoding": {"strategy": "greedy"}})
    assert response.status_code == 200, response.text
    data = response.json()
    assert (data["captioned"], data["skipped"], data["failed"], data["interrupted"]) == (5, 0, [], False)
    assert data["model"] == TINY
    texts = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert sorted(texts) == sorted(p.stem for p in photos[:5])
    assert all(text.startswith("sks, ") for text in texts.values())
    assert lock.acquisitions == before + 1 and not lock.locked()
    assert state.history[-2:] == [("begin", "captioners batch"), ("end", "captioners batch")]
    assert state.job_no == 5, "progress went to the WebUI's own job state"
    again = client.post("/captioners/v1/batch", json={"inputs": [str(folder)]}).json()
    assert (again["captioned"], again["skipped"]) == (0, 5), "existing captions are skipped by default"


@pytest.mark.parametrize("job, words", [
    ({"existing": "sometimes"}, "existing"),
    ({"colour": "red"}, "Unknown"),
    ({"batch_size": 0}, "batch_size"),
    ({"extension": ".png"}, "image extension"),
])
def test_bad_batch_jobs_are_400(client, photos, tmp_path, job, words):
    folder = photo_folder(tmp_path / "set", photos, 1)
    response = client.post("/captioners/v1/batch", json={"inputs": [str(folder)], **job})
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]
    assert not list(folder.glob("*.txt"))


@pytest.mark.parametrize("how", ["api", "webui"])
def test_interrupt_stops_a_running_batch(webui, client, tmp_path, how):
    import threading
    import time

    folder = small_images(tmp_path / "many", 400)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        response=client.post("/captioners/v1/batch", json={"inputs": [str(folder)], "batch_size": 1})))
    worker.start()
    deadline = time.monotonic() + 120
    while webui.shared.state.job_no < 2 and time.monotonic() < deadline:  # under way
        time.sleep(0.05)
    if how == "api":
        interrupter = TestClient(client.app)
        assert interrupter.post("/captioners/v1/interrupt").json() == {"interrupted": True}
    else:
        webui.shared.state.interrupt()  # the WebUI's own Interrupt button
    worker.join(120)
    data = result["response"].json()
    assert data["interrupted"] and 0 < data["captioned"] < 400
    assert len(list(folder.glob("*.txt"))) == data["captioned"]
    assert not webui.shared.state.busy and not webui.call_queue.queue_lock.locked()
