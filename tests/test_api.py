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

    monkeypatch.setattr(extension.service, "judge", broken)
    response = client.post("/captioners/v1/caption", json={"image": b64(photos[0])})
    assert response.status_code == 500
    assert response.json() == {"detail": "ZeroDivisionError: oops (details in the server log)"}


# ---- big images: sizes are read from headers, decoding waits for the job --------------------------
def bilevel_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of ``width`` x ``height`` black pixels: a few KiB that decode to width*height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_a_huge_image_is_refused_from_its_header_with_413(client):
    bomb = bilevel_png(15000, 10000)  # 150 million pixels in a few KiB; decoded as RGB it would take 450 MB
    assert len(bomb) < 64 * 1024
    response = client.post("/captioners/v1/caption", json={"image": base64.b64encode(bomb).decode()})
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail.splitlines()) == 1
    assert "15000x10000" in detail and "million" in detail


def test_many_big_images_are_refused_by_the_per_request_limit(client):
    big = base64.b64encode(bilevel_png(8000, 7500)).decode()  # 60 million pixels: under the per-image limit
    response = client.post("/captioners/v1/caption", json={"images": [big] * 5})
    assert response.status_code == 413, response.text
    assert "per request" in response.json()["detail"]


def test_a_total_just_above_the_limit_never_reads_as_the_limit(webui, client, photos):
    import re

    webui.shared.opts.set("captioners_max_request_mpixels", 0.5)
    try:
        images = [b64(photos[0])] * 2
        width, height = Image.open(photos[0]).size
        response = client.post("/captioners/v1/caption", json={"images": images})
    finally:
        webui.shared.opts.set("captioners_max_request_mpixels", 256)
    detail = response.json()["detail"]
    shown = float(re.search(r"have ([0-9.]+) million", detail).group(1))
    assert response.status_code == 413 and shown > 0.5 and abs(shown - 2 * width * height / 1e6) < 1e-3, detail


def test_limits_come_from_settings(webui, client, photos):
    webui.shared.opts.set("captioners_max_image_mpixels", 0.01)  # 10 000 pixels
    try:
        response = client.post("/captioners/v1/caption", json={"image": b64(photos[0])})
        assert response.status_code == 413 and "0.01 million per image" in response.json()["detail"]
    finally:
        webui.shared.opts.set("captioners_max_image_mpixels", 64)
    assert client.post("/captioners/v1/caption", json={"image": b64(photos[0])}).status_code == 200


def test_images_are_decoded_one_by_one_inside_the_job(webui, client, photos, monkeypatch):
    from captioners.images import EncodedImage

    lock, seen = webui.call_queue.queue_lock, []
    decode = EncodedImage.decode

    def recording(self):
        seen.append(lock.locked())
        return decode(self)

    monkeypatch.setattr(EncodedImage, "decode", recording)
    response = client.post("/captioners/v1/caption", json={"images": [b64(photos[0]), b64(photos[1])]})
    assert response.status_code == 200, response.text
    assert seen == [True, True]  # decoded under the queue lock, not while the request was parsed


def test_a_damaged_image_body_is_a_400_and_keeps_the_model(client, photos):
    data = base64.b64decode(b64(photos[0]))
    truncated = base64.b64encode(data[: len(data) // 3]).decode()  # a valid header, then nothing
    assert client.post("/captioners/v1/caption", json={"image": b64(photos[0])}).status_code == 200
    response = client.post("/captioners/v1/caption", json={"image": truncated})
    assert response.status_code == 400, response.text
    assert "image" in response.json()["detail"] and "BytesIO" not in response.json()["detail"]
    assert client.get("/captioners/v1/models").json()["loaded"] == TINY


# ---- option types and ranges, malformed bodies ----------------------------------------------------
@pytest.mark.parametrize("options, words", [
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"num_beams": 1000000}, "num_beams must be at least 1 and at most 32"),
    ({"num_beams": 2.5}, "num_beams must be a whole number"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"top_p": 1.5}, "top_p must be"),
    ({"seed": -5}, "seed must be"),
    ({"num_candidates": 10000}, "num_candidates must be at least 1 and at most 64"),
    ({"keep_prompt": "yes"}, "keep_prompt must be true or false"),
    ({"prompt": 5}, "prompt must be text"),
    ({"top_k": True}, "top_k must be a whole number"),
])
def test_wrong_option_types_and_absurd_values_are_400(client, photos, options, words):
    response = client.post("/captioners/v1/caption", json={"image": b64(photos[0]), "options": options})
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]


@pytest.mark.parametrize("job, words", [
    ({"inputs": ["."], "batch_size": 100000}, "batch_size must be"),
    ({"inputs": ["."], "batch_size": "many"}, "batch_size must be"),
    ({"inputs": ["."], "workers": -1}, "workers must be"),
    ({"inputs": ["."], "decoding": {"num_beams": 999}}, "num_beams must be"),
    ({"inputs": ["."], "decoding": "beam"}, "Decoding options must be an object"),
])
def test_bad_batch_options_are_400(client, job, words):
    response = client.post("/captioners/v1/batch", json=job)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]


@pytest.mark.parametrize("route", ["/captioners/v1/caption", "/captioners/v1/batch"])
@pytest.mark.parametrize("body, words", [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"image": "abc', "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
])
def test_malformed_bodies_get_a_one_line_detail(client, route, body, words):
    response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail.splitlines()) == 1 and words in detail


# ---- judged captions ----------------------------------------------------------------------------
def test_caption_returns_scores_several_captions_and_flags(client, photos):
    response = client.post("/captioners/v1/caption", json={
        "images": [b64(photos[0]), b64(photos[1])], "judging": {"score": True},
        "options": {"captions_per_image": 3, "strategy": "beam", "max_new_tokens": 20}})
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["results"]) == 2 and data["captions"] == [r["caption"] for r in data["results"]]
    for result in data["results"]:
        assert len(result["captions"]) == 3 and len({c["caption"] for c in result["captions"]}) == 3
        assert all(isinstance(c["clip_score"], float) and c["model"] == TINY for c in result["captions"])
        assert result["clip_score"] == result["captions"][0]["clip_score"]
        assert isinstance(result["flags"], list) and result["skipped"] is False
    plain = client.post("/captioners/v1/caption", json={"image": b64(photos[0])}).json()
    assert plain["results"][0]["clip_score"] is None and len(plain["results"][0]["captions"]) == 1


@pytest.mark.parametrize("body", [
    {"judging": {"score": "yes"}}, {"judging": {"on_flag": "maybe"}}, {"judging": []}, {"judging": {"x": 1}},
    {"options": {"captions_per_image": 0}}, {"options": {"select": "best"}}, {"options": {"guidance": -2}},
    {"options": {"candidates": 3}}, {"model": [TINY, 3]},
])
def test_bad_judging_requests_are_400(client, photos, body):
    response = client.post("/captioners/v1/caption", json={"image": b64(photos[0]), **body})
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["detail"], str) and "\n" not in response.json()["detail"]


def test_batch_with_judging_reports_scores_and_flags(client, photos, tmp_path):
    import shutil

    folder = tmp_path / "set"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, folder / photo.name)
    response = client.post("/captioners/v1/batch", json={
        "inputs": [str(folder)], "judging": {"score": True}, "decoding": {"captions_per_image": 2, "max_new_tokens": 20},
        "report_html": str(tmp_path / "report.html")})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["captioned"] == 3 and data["clip_score"]["count"] == 3
    assert set(data["flags"]) >= {"empty", "short", "repetition", "over_budget", "low_score"}
    assert data["report_html"] == str(tmp_path / "report.html") and (tmp_path / "report.html").is_file()
    assert all(len(p.read_text().splitlines()) == 2 for p in folder.glob("*.txt"))
    bad = client.post("/captioners/v1/batch", json={"inputs": [str(folder)], "judging": {"max_tokens": 10}})
    assert bad.status_code == 400 and "shaping.max_tokens" in bad.json()["detail"]


def test_several_models_rank_their_candidates_together(client, photos):
    response = client.post("/captioners/v1/caption", json={
        "image": b64(photos[0]), "model": [TINY, TINY], "judging": {"score": True},
        "options": {"select": "clip", "strategy": "beam", "num_candidates": 3, "captions_per_image": 2,
                    "max_new_tokens": 20}})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == f"{TINY},{TINY}"
    scores = [c["clip_score"] for c in data["results"][0]["captions"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert client.get("/captioners/v1/models").json()["loaded"] == TINY  # the extra copy was freed


# ---- captioning a region: "mask" (a base64 image) or "box" -----------------------------------------
def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def area_mask(size, rect, mode="L") -> Image.Image:
    from PIL import ImageDraw

    mask = Image.new(mode, size, 0)
    ImageDraw.Draw(mask).rectangle(rect, fill=255)  # inclusive corners
    return mask


def caption_of(client, image: Image.Image) -> str:
    return client.post("/captioners/v1/caption", json={"image": png_b64(image)}).json()["captions"][0]


def test_a_mask_or_a_box_captions_only_that_region(client, photos):
    from captioners.regions import Box, RegionOptions, crop_region

    photo = Image.open(photos[0]).convert("RGB")
    width, height = photo.size
    rect = (width // 4, height // 4, width // 2, height // 2)
    expected = crop_region(photo, area_mask(photo.size, rect))
    response = client.post("/captioners/v1/caption", json={"image": b64(photos[0]),
                                                           "mask": png_b64(area_mask(photo.size, rect))})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["regions"] == [expected.box.to_dict()]
    assert data["captions"] == [caption_of(client, expected.image)]
    # The same area as a box ({x, y, w, h} or [x, y, w, h]), greyed outside, on two images.
    box = Box(rect[0], rect[1], rect[2] - rect[0] + 1, rect[3] - rect[1] + 1)
    grey = crop_region(photo, box, RegionOptions(outside="grey"))
    for given in (box.to_dict(), list(box)):
        data = client.post("/captioners/v1/caption", json={
            "images": [b64(photos[0]), b64(photos[0])], "box": given, "region": {"outside": "grey"}}).json()
        assert data["regions"] == [grey.box.to_dict()] * 2 and grey.box == expected.box
        assert data["captions"] == [caption_of(client, grey.image)] * 2
    assert "regions" not in client.post("/captioners/v1/caption", json={"image": b64(photos[0])}).json()


def test_a_mask_of_another_size_and_an_rgba_mask(client, photos):
    photo = Image.open(photos[0]).convert("RGB")
    small = area_mask((photo.width // 2, photo.height // 2), (10, 10, 19, 19))
    transparent = Image.new("RGBA", photo.size, (255, 255, 255, 0))  # alpha is the mask
    transparent.paste((0, 0, 0, 255), (20, 20, 40, 40))
    from captioners.regions import mask_box

    assert mask_box(transparent) == (20, 20, 20, 20) and mask_box(small, photo.size)[:2] == (20, 20)
    for mask in (small, transparent):
        data = client.post("/captioners/v1/caption", json={"image": b64(photos[0]), "mask": png_b64(mask),
                                                           "region": {"margin": 0, "min_margin": 0, "min_size": 0}})
        assert data.json()["regions"] == [mask_box(mask, photo.size).to_dict()], data.text


def test_region_defaults_come_from_settings(webui, client, photos):
    webui.shared.opts.set("captioners_region_margin", 100)
    try:
        data = client.post("/captioners/v1/caption", json={"image": b64(photos[0]), "box": [100, 100, 50, 50]}).json()
    finally:
        webui.shared.opts.set("captioners_region_margin", 10)
    assert data["regions"] == [{"x": 50, "y": 50, "w": 150, "h": 150}]


@pytest.mark.parametrize("extra, status, words", [
    ({"box": [0, 0, 10, 10], "mask": "MASK"}, 400, "either 'mask'"),
    ({"region": {"outside": "grey"}}, 400, "need a 'mask'"),
    ({"box": [0, 0, 10]}, 400, "[x, y, w, h]"),
    ({"box": {"x": 0, "y": 0, "w": 10}}, 400, "exactly the keys x, y, w, h"),
    ({"box": [0, 0, 0, 10]}, 400, "box.w must be at least 1"),
    ({"box": [-5, 0, 10, 10]}, 400, "box.x must be at least 0"),
    ({"box": [0.5, 0, 10, 10]}, 400, "box.x must be a whole number"),
    ({"box": "0,0,10,10"}, 400, "[x, y, w, h]"),
    ({"box": [0, 0, 100000, 10]}, 400, "image: 'box' (100000x10 at 0,0) does not fit in the"),
    ({"box": [0, 0, 10, 10], "region": {"outside": "black"}}, 400, "outside must be one of keep, grey, blur"),
    ({"box": [0, 0, 10, 10], "region": {"margin": "lots"}}, 400, "margin must be a number"),
    ({"box": [0, 0, 10, 10], "region": {"feather": 3}}, 400, "Unknown region option"),
    ({"box": [0, 0, 10, 10], "region": [1]}, 400, "'region' must be an object"),
    ({"mask": "not base64!"}, 400, "mask is not valid base64"),
    ({"mask": None}, 400, "mask must be a base64-encoded image string"),
    ({"mask": base64.b64encode(b"no image").decode()}, 400, "mask is not an image"),
    ({"mask": "EMPTY"}, 400, "The mask is empty"),
    ({"mask": "HUGE"}, 413, "mask is 15000x10000"),
])
def test_bad_regions_get_a_4xx_with_one_clear_message(client, photos, extra, status, words):
    if extra.get("mask") == "MASK":
        extra = {**extra, "mask": png_b64(area_mask((64, 64), (1, 1, 9, 9)))}
    elif extra.get("mask") == "EMPTY":
        extra = {"mask": png_b64(Image.new("L", (64, 64)))}
    elif extra.get("mask") == "HUGE":
        extra = {"mask": base64.b64encode(bilevel_png(15000, 10000)).decode()}
    response = client.post("/captioners/v1/caption", json={"image": b64(photos[0]), **extra})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail
