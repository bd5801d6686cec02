"""REST API routes, mounted by the WebUI adapter on a real FastAPI app (FastAPI's TestClient)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.webui_host import TINY, start_webui

ROOT = Path(__file__).resolve().parents[1]
# The routes do not depend on the host's flavour (that is tested in test_webui_adapter.py).
pytestmark = pytest.mark.parametrize("webui", ["a1111"], indirect=True)


def b64(path: Path, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_models_lists_every_id_with_its_files(client):
    data = client.get("/captioners/v1/models").json()
    ids = [m["id"] for m in data["models"]]
    assert TINY in ids and "clip-prefix-flickr8k-gradient" in ids
    tiny = next(m for m in data["models"] if m["id"] == TINY)
    assert tiny["ready"] and all(f["present"] for f in tiny["files"])
    builtin = next(m for m in data["models"] if m["id"] == "clipcap-coco")
    assert not builtin["ready"] and "huggingface.co" in builtin["files"][0]["source"]
    assert data["default"] == TINY and data["loaded"] is None


def test_caption_runs_under_the_queue_lock(webui, client, photos):
    lock, state = webui.call_queue.queue_lock, webui.shared.state
    before = lock.acquisitions
    response = client.post("/captioners/v1/caption", json={"images": [b64(photos[0]), b64(photos[1], "JPEG")]})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == TINY and len(data["captions"]) == 2 and all(data["captions"])
    assert lock.acquisitions == before + 1 and not lock.locked()
    assert state.history[-2:] == [("begin", "captioners"), ("end", "captioners")]
    # One image, a data URL, decoding options, an explicit model: same caption as in the batch.
    one = client.post("/captioners/v1/caption", json={
        "image": "data:image/png;base64," + b64(photos[0]), "model": TINY, "options": {"strategy": "greedy"}})
    assert one.json()["captions"] == data["captions"][:1]
    assert client.get("/captioners/v1/models").json()["loaded"] == TINY
    assert client.post("/captioners/v1/unload").json() == {"unloaded": TINY}
    assert client.post("/captioners/v1/unload").json() == {"unloaded": None}


@pytest.mark.parametrize("body, status, words", [
    ({"image": "not base64!"}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"plain text, not an image").decode()}, 400, "not an image"),
    ({"images": []}, 400, "non-empty list"),
    ({"image": "", "images": []}, 400, "either"),
    ({"image": "x", "colour": "red"}, 400, "Unknown field"),
    ({"image": "IMAGE", "options": {"beams": 3}}, 400, "Unknown decoding option"),
    ({"image": "IMAGE", "options": {"strategy": "telepathy"}}, 400, "strategy"),
    ({"image": "IMAGE", "model": "no-such-model"}, 404, "Unknown model"),
    ({"image": "IMAGE", "model": "clipcap-coco"}, 409, "coco_weights.pt"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_caption_requests_get_a_4xx_with_a_message(client, photos, body, status, words):
    if isinstance(body, dict) and body.get("image") == "IMAGE":
        body = {**body, "image": b64(photos[0])}
    response = client.post("/captioners/v1/caption", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_missing_weights_message_names_file_source_and_folder(client, photos):
    detail = client.post("/captioners/v1/caption", json={"image": b64(photos[0]), "model": "clipcap-coco"}
                         ).json()["detail"]
    assert "coco_weights.pt" in detail and "huggingface.co/akhaliq" in detail and "Captioners" in detail


def test_interrupt_without_a_batch(client):
    assert client.post("/captioners/v1/interrupt").json() == {"interrupted": False}


def test_api_auth_protects_every_route(webui, photos):
    _, client = start_webui(webui, api_auth="alice:secret,bob:pw")
    try:
        routes = [("GET", "/captioners/v1/models", None), ("POST", "/captioners/v1/caption", {"image": b64(photos[0])}),
                  ("POST", "/captioners/v1/batch", {"inputs": ["x"]}), ("POST", "/captioners/v1/interrupt", None),
                  ("POST", "/captioners/v1/unload", None)]
        for method, url, body in routes:
            assert client.request(method, url, json=body).status_code == 401
            assert client.request(method, url, json=body, auth=("alice", "wrong")).status_code == 401
            assert client.request(method, url, json=body, auth=("mallory", "secret")).status_code == 401
        assert client.get("/captioners/v1/models", auth=("bob", "pw")).status_code == 200
        ok = client.post("/captioners/v1/caption", json={"image": b64(photos[0])}, auth=("alice", "secret"))
        assert ok.status_code == 200 and ok.json()["captions"]
    finally:
        webui.shared.cmd_opts.api, webui.shared.cmd_opts.api_auth = True, None


def test_no_routes_without_the_webuis_api_flag(webui):
    _, client = start_webui(webui, api=False)
    try:
        assert client.get("/captioners/v1/models").status_code == 404
    finally:
        webui.shared.cmd_opts.api = True


def test_unexpected_errors_are_500_without_a_traceback(webui, photos, monkeypatch):
    extension, client = start_webui(webui)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(extension.service, "caption", broken)
    response = client.post("/captioners/v1/caption", json={"image": b64(photos[0])})
    assert response.status_code == 500
    assert response.json() == {"detail": "ZeroDivisionError: oops (details in the server log)"}
