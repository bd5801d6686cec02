"""The img2img masked-area button (🎯) and the region Settings, on the stand-in WebUI of each host.

Each sub-tab's value is built as that host hands it over: A1111 / reForge (gradio 3) give Inpaint a
``{"image", "mask"}`` dict, Inpaint sketch its drawn image plus the gr.State of the image before
drawing; Forge's and Forge Neo's canvases give a background and a foreground (the strokes, mask =
their alpha).
Inpaint upload is two gr.Image everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

from captioners.regions import Box, RegionOptions, crop_region
from tests.webui_host import CANVAS_HOSTS, TINY

ROOT = Path(__file__).resolve().parents[1]
any_host = pytest.mark.parametrize("webui", ["a1111"], indirect=True)
AREA = (60, 40, 99, 79)  # the painted rectangle (inclusive corners)


@pytest.fixture()
def extension(webui):
    spec = importlib.util.spec_from_file_location("captioners_webui.py", ROOT / "scripts" / "captioners_webui.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    webui.script_callbacks.ui_settings_callback()
    webui.shared.opts.set("captioners_model", TINY)
    return script.extension


@pytest.fixture()
def button(webui, extension):
    """The wired button, captioning into a list instead of running the model."""
    webui.ui.create_img2img(forge=webui.host in CANVAS_HOSTS)
    button = extension.img2img
    button.captioned = []
    button.caption = lambda image: button.captioned.append(image) or "a red square"
    return button


@pytest.fixture()
def photo(photos) -> Image.Image:
    return Image.open(photos[0]).convert("RGB").resize((256, 192))


def strokes(size, mode="RGBA", colour=(255, 255, 255, 255), background=(0, 0, 0, 0)) -> Image.Image:
    layer = Image.new(mode, size, background)
    ImageDraw.Draw(layer).rectangle(AREA, fill=colour)
    return layer


def values_for(host: str, tab: int, image: Image.Image) -> tuple:
    """The six values the button gets (Inpaint, its layer, Inpaint sketch, its layer or original,
    Inpaint upload, its mask) with AREA painted in sub-tab ``tab``, as ``host`` gives them."""
    forge = host in CANVAS_HOSTS
    values = [None] * 6
    if tab == 2 and forge:
        values[0], values[1] = image.convert("RGBA"), strokes(image.size)
    elif tab == 2:  # gradio 3.41 turns the sketch tool's RGBA strokes into white on black RGB
        values[0] = {"image": image.convert("RGBA"), "mask": strokes(image.size, "RGB", (255, 255, 255), (0, 0, 0))}
    elif tab == 3 and forge:
        values[2], values[3] = image.convert("RGBA"), strokes(image.size, colour=(255, 0, 0, 255))
    elif tab == 3:
        drawn = image.copy()
        ImageDraw.Draw(drawn).rectangle(AREA, fill=(255, 0, 0))
        values[2], values[3] = drawn, image
    elif tab == 4:  # an uploaded mask: RGBA (image_mode) of a white-on-black file, fully opaque
        values[4], values[5] = image, strokes(image.size, "RGB", (255, 255, 255), (0, 0, 0)).convert("RGBA")
    return tuple(values)


def _dependency(blocks, component):
    for dep in blocks.config["dependencies"]:
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]
        if component._id in targets:
            return dep
    raise AssertionError("no event")


def test_region_button_sits_after_the_caption_button_and_reads_every_inpaint_subtab(webui, extension):
    forge = webui.host in CANVAS_HOSTS
    demo, made = webui.ui.create_img2img(forge=forge)
    button = extension.img2img
    assert webui.script_callbacks.errors == []
    anchor = made.get("deepbooru") or made["restore_progress"]  # Forge Neo has no 📦
    children = anchor.parent.children
    index = children.index(anchor)
    assert children[index + 1] is button.button and children[index + 2] is button.region_button
    dep = _dependency(demo, button.region_button)
    assert dep.get("js") == "captioners_img2img_region_args" and dep["outputs"] == [made["prompt"]._id]
    inputs = dep["inputs"]
    assert inputs[:3] == [button.tab_index._id, button.mask_mode._id, made["prompt"]._id]
    if forge:
        expected = [made["inpaint"].background, made["inpaint"].foreground, made["inpaint_sketch"].background,
                    made["inpaint_sketch"].foreground]
        assert button.canvases == {"img2img_image", "img2img_sketch", "img2maskimg", "inpaint_sketch"}
    else:
        expected = [made["inpaint"], None, made["inpaint_sketch"], made["inpaint_sketch_orig"]]
        assert button.sketch_original is made["inpaint_sketch_orig"] and not button.canvases
    expected += [made["inpaint_upload"], made["inpaint_upload_mask"]]
    for got, component in zip(inputs[3:], expected):
        if component is None:  # A1111's Inpaint layer is inside the value: a placeholder
            assert isinstance(demo.blocks[got], gr.State)
        else:
            assert got == component._id
    # The 💬 button still reads the five images only.
    assert len(_dependency(demo, button.button)["inputs"]) == 7


@pytest.mark.parametrize("tab", [2, 3, 4])
def test_each_inpaint_subtab_captions_the_crop_around_its_mask(webui, button, photo, tab):
    new_prompt = button.run_region(tab, 0, "old prompt", *values_for(webui.host, tab, photo))
    assert new_prompt == "a red square"  # the Settings' prompt mode: replace
    [crop] = button.captioned
    expected = crop_region(photo if tab != 3 else values_for(webui.host, 3, photo)[2], Box(60, 40, 40, 40))
    if webui.host in CANVAS_HOSTS and tab == 3:  # the canvas: background with the strokes over it
        layered = photo.copy()
        ImageDraw.Draw(layered).rectangle(AREA, fill=(255, 0, 0))
        expected = crop_region(layered, Box(60, 40, 40, 40))
    assert expected.box == Box(48, 28, 64, 64) and crop.size == (64, 64)  # 40 + 2 x 8 px, grown to 64
    assert np.array_equal(np.asarray(crop), np.asarray(expected.image))


def test_the_outside_and_margin_settings_apply(webui, button, photo):
    webui.shared.opts.set("captioners_region_outside", "grey")
    webui.shared.opts.set("captioners_region_margin", 50)
    button.run_region(4, 0, "", *values_for(webui.host, 4, photo))
    [crop] = button.captioned
    assert crop.size == (80, 80)  # 40 px + 20 px each side
    assert crop.getpixel((0, 0)) == (128, 128, 128) and crop.getpixel((40, 40)) == photo.getpixel((80, 60))


@any_host
def test_inpaint_not_masked_captions_the_rest(webui, button, photo):
    """The page sends Mask mode's index: 1 is "Inpaint not masked"."""
    webui.shared.opts.set("captioners_region_margin", 0)
    button.run_region(4, 1, "", *values_for(webui.host, 4, photo))
    [crop] = button.captioned
    assert crop.size == photo.size  # the unmasked area's box is the whole image here


@any_host
def test_prompt_modes_apply(webui, button, photo):
    webui.shared.opts.set("captioners_prompt_mode", "append")
    assert button.run_region(2, 0, "a photo,", *values_for(webui.host, 2, photo)) == "a photo, a red square"


def test_tabs_without_a_mask_get_a_warning_and_keep_the_prompt(webui, button, photo, monkeypatch):
    import captioners.webui.img2img as img2img

    shown = []
    monkeypatch.setattr(img2img, "warn", shown.append)
    forge = webui.host in CANVAS_HOSTS
    nothing = [None] * 6
    assert button.run_region(0, 0, "kept", *nothing) == gr.update()  # img2img: no mask there
    assert button.run_region(5, 0, "kept", *nothing) == gr.update()  # Batch
    assert button.run_region(2, 0, "kept", *nothing) == gr.update()  # Inpaint without an image
    empty = ({"image": photo, "mask": Image.new("RGB", photo.size)}, None) if not forge else \
        (photo.convert("RGBA"), Image.new("RGBA", photo.size, (0, 0, 0, 0)))
    assert button.run_region(2, 0, "kept", *empty, None, None, None, None) == gr.update()  # nothing painted
    # Inpaint sketch before anything is drawn (A1111: no original kept yet; Forge: an empty layer)
    assert button.run_region(3, 0, "kept", None, None, photo, None, None, None) == gr.update()
    assert button.run_region(4, 0, "kept", None, None, None, None, photo, None) == gr.update()  # no mask uploaded
    assert button.captioned == []
    assert "Inpaint, Inpaint sketch and Inpaint upload" in shown[0] and shown[1] == shown[0]
    assert "No image in the open img2img tab" in shown[2]
    assert all("Nothing is masked" in text for text in shown[3:]), shown
    assert len(shown) == 6


@any_host
def test_an_inpaint_sketch_of_another_size_than_its_original_is_refused(webui, button, photo, monkeypatch):
    import captioners.webui.img2img as img2img

    shown = []
    monkeypatch.setattr(img2img, "warn", shown.append)
    assert button.run_region(3, 0, "kept", None, None, photo, photo.resize((64, 48)), None, None) == gr.update()
    assert "differ in size" in shown[0]


@any_host
def test_the_region_is_captioned_by_the_model_under_the_queue_lock(webui, extension, photo):
    webui.ui.create_img2img()
    button = extension.img2img
    values = values_for("a1111", 4, photo)
    expected = extension.service.caption([crop_region(photo, values[5], RegionOptions()).image])[1][0]
    lock = webui.call_queue.queue_lock
    before = lock.acquisitions
    assert button.run_region(4, 0, "old", *values) == expected
    assert lock.acquisitions == before + 1 and not lock.locked() and not webui.shared.state.busy


@any_host
def test_region_settings_are_registered_and_read(webui, extension):
    opts = webui.shared.opts
    for key in ("captioners_region_outside", "captioners_region_margin"):
        info = opts.data_labels[key]
        assert info.section == ("captioners", "Captioners") and info.component is not None
    assert extension.service.settings().region == RegionOptions()
    opts.set("captioners_region_outside", "blur")
    opts.set("captioners_region_margin", 25.0)  # a slider gives floats
    assert extension.service.settings().region == RegionOptions(outside="blur", margin=0.25)
    opts.set("captioners_region_outside", "sideways")  # a value the page cannot save: the default
    opts.set("captioners_region_margin", "lots")
    assert extension.service.settings().region == RegionOptions()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_region_js_sends_the_open_subtab_the_mask_mode_and_only_the_inputs():
    script = """
        var radios = [{checked: false}, {checked: true}];
        function gradioApp() { return { querySelectorAll: function (selector) {
            if (selector !== "#img2img_mask_mode input[type=radio]") throw selector; return radios; } }; }
    """ + (ROOT / "javascript" / "captioners.js").read_text() + """
        function get_tab_index(id) { if (id !== "mode_img2img") throw id; return 2; }
        // gradio passes the inputs (tab, mask mode, prompt, 6 values) then the outputs' values (prompt)
        var first = captioners_img2img_region_args(0, 0, "p", "a", "b", "c", "d", "e", "f", "p");
        radios = [];  // no Mask mode radio in the page: inpaint masked
        var second = captioners_img2img_region_args(0, 0, "p", "a", "b", "c", "d", "e", "f", "p");
        console.log(JSON.stringify([first, second[1]]));
    """
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[2, 1, "p", "a", "b", "c", "d", "e", "f"], 0]
