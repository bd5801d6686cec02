"""The Caption tab's Region (a painted mask or an x, y, w, h box), without a browser, in this gradio."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

from captioners.regions import Box, RegionOptions, crop_region
from captioners.service import CaptionService, Host, Settings
from captioners.ui import build_tab
from captioners.ui.compat import GRADIO_MAJOR, mask_editor_image
from captioners.ui.region import NO_REGION, REDRAW_ID, REDRAW_ON_OPEN, caption_region, region_of
from tests.webui_host import TINY


@pytest.fixture()
def service(tiny_models_dir):
    settings = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu",
                        region=RegionOptions(outside="grey", margin=0.2))
    return CaptionService(Host(lambda: settings))


@pytest.fixture()
def photo(photos) -> Image.Image:
    return Image.open(photos[0]).convert("RGB").resize((240, 160))


def painted(photo: Image.Image) -> dict:
    """The brush's value in this gradio, with (20, 30)-(59, 69) painted."""
    if GRADIO_MAJOR >= 4:
        layer = Image.new("RGBA", photo.size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).rectangle((20, 30, 59, 69), fill=(255, 0, 255, 255))
        return {"background": photo, "layers": [layer], "composite": photo}
    mask = Image.new("RGB", photo.size)
    ImageDraw.Draw(mask).rectangle((20, 30, 59, 69), fill=(255, 255, 255))
    return {"image": photo, "mask": mask}


def test_region_controls_are_in_the_tab_and_the_brush_gets_the_uploaded_image(service):
    blocks = build_tab(service)
    by_id = {getattr(block, "elem_id", None): block for block in blocks.blocks.values()}
    for elem_id in ("captioners_region", "captioners_region_mask", "captioners_region_x", "captioners_region_y",
                    "captioners_region_w", "captioners_region_h", "captioners_region_outside",
                    "captioners_region_margin", "captioners_region_button"):
        assert elem_id in by_id
    editor = by_id["captioners_region_mask"]
    assert isinstance(editor, gr.ImageMask) if GRADIO_MAJOR >= 4 else editor.tool == "sketch"
    # The defaults come from the service's Settings.
    assert by_id["captioners_region_outside"].value == "grey" and by_id["captioners_region_margin"].value == 20
    image = by_id["captioners_image"]
    copies = [dep for dep in blocks.config["dependencies"]
              if dep["inputs"] == [image._id] and dep["outputs"] == [editor._id]]
    triggers = sorted(_trigger(dep) for dep in copies)
    if GRADIO_MAJOR >= 4:
        assert triggers == ["change"] and REDRAW_ID not in by_id
    else:  # gradio 3's brush draws nothing it got while hidden: the redraw button gives it the image again
        redraw = by_id[REDRAW_ID]
        assert triggers == ["change", "then"] and not redraw.visible  # the redraw: clear, then copy
        clears = [dep for dep in blocks.config["dependencies"]
                  if _targets(dep) == [redraw._id] and not dep["inputs"] and dep["outputs"] == [editor._id]]
        assert [_trigger(dep) for dep in clears] == ["click"]
        scripts = [dep.get("js") for dep in blocks.config["dependencies"] if _trigger(dep) == "load"]
        assert REDRAW_ON_OPEN in scripts and REDRAW_ID in REDRAW_ON_OPEN


def test_the_brush_gets_a_radius_for_the_image_size_in_gradio_3(photo):
    """Gradio 3 derives its default radius from the editor's size on screen, infinite while it is
    hidden (the closed accordion), and then paints nothing: the copy carries a radius of its own."""
    value = mask_editor_image(photo)
    if GRADIO_MAJOR >= 4:
        assert value is photo
    else:
        assert value["value"] is photo and value["brush_radius"] == round(0.04 * max(photo.size))
        assert mask_editor_image(Image.new("RGB", (20, 10)))["brush_radius"] == 2
    assert mask_editor_image(None) is None


def _trigger(dep: dict) -> str:
    """An event's name in gradio 3 (``trigger``) and from 4 (``targets`` of (id, name) pairs)."""
    if "trigger" in dep:
        return dep["trigger"]
    return dep["targets"][0][1]


def _targets(dep: dict) -> list:
    return [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]


def test_a_painted_mask_wins_over_the_box(photo):
    image, region = region_of(None, painted(photo), 0, 0, 10, 10)
    assert image is photo and isinstance(region, np.ndarray) and region[30, 20] and not region[0, 0]
    image, region = region_of(photo, {"background": photo, "layers": [], "composite": photo}, 1, 2, 30.0, 40.0)
    assert image is photo and region == Box(1, 2, 30, 40)  # nothing painted: the box


def test_without_a_mask_or_a_box_the_status_says_what_to_do(service, photo):
    caption, status, table = caption_region(service, photo, None, 0, 0, 0, 0, "keep", 10, TINY)
    assert caption == gr.update() and status == f"Error: {NO_REGION}" and table == ""
    _, status, _ = caption_region(service, None, None, 0, 0, 10, 10, "keep", 10, TINY)
    assert status == "Error: Upload an image first."
    _, status, _ = caption_region(service, photo, None, 200, 0, 50, 10, "keep", 10, TINY)
    assert status == "Error: 'box' (50x10 at 200,0) does not fit in the 240x160 image."
    _, status, _ = caption_region(service, photo, None, 0.5, 0, 50, 10, "keep", 10, TINY)
    assert "box.x must be a whole number" in status


def test_a_box_is_captioned_as_its_crop(service, photo):
    expected_crop = crop_region(photo, Box(100, 50, 80, 60), RegionOptions(outside="blur", margin=0.1))
    expected = service.caption([expected_crop.image])[1][0]
    caption, status, _ = caption_region(service, photo, None, 100, 50, 80, 60, "blur", 10, TINY)
    assert caption == expected
    # 10 % margin: 8 px across, 6 -> 8 px down (the pixel minimum)
    assert re.fullmatch(rf"{TINY} · [0-9.]+ s( · [^·]+)? · region 96x76 at 92,42", status), status


def test_a_painted_mask_is_captioned_as_its_crop(service, photo):
    mask = np.zeros((160, 240), dtype=bool)
    mask[30:70, 20:60] = True
    expected = service.caption([crop_region(photo, mask, RegionOptions(outside="grey", margin=0)).image])[1][0]
    caption, status, _ = caption_region(service, photo, painted(photo), 0, 0, 0, 0, "grey", 0, TINY)
    assert caption == expected and status.endswith("region 64x64 at 8,18"), status
