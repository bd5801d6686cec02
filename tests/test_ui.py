"""The shared tab's handlers and the caption service, without a browser; install.py and the page's JS."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from captioners.errors import CaptionerError
from captioners.service import CaptionService, Host, Settings
from captioners.ui import build_tab, render
from captioners.ui.controls import decoding_mapping, model_choices, refresh_models
from captioners.ui.local_paths import save_paths, show_paths
from captioners.ui.tab import caption_image, download_model, unload_model
from tests.webui_host import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def service(tiny_models_dir):
    settings = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu")
    return CaptionService(Host(lambda: settings))


def test_tab_builds_in_this_gradio(service):
    blocks = build_tab(service, title="Captioners", css=".x{}")
    assert isinstance(blocks, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    for elem_id in ("captioners_image", "captioners_model", "captioners_caption_button", "captioners_caption",
                    "captioners_batch_inputs", "captioners_batch_start", "captioners_batch_interrupt",
                    "captioners_models_table", "captioners_download", "captioners_unload", "captioners_path_weights"):
        assert elem_id in ids


def test_dropdown_marks_models_with_missing_files(service):
    labels, default = model_choices(service)
    assert default == TINY and TINY in labels
    assert "clipcap-coco" + render.MISSING in labels
    assert render.model_id("clipcap-coco" + render.MISSING) == "clipcap-coco"
    update, table = refresh_models(service, "clipcap-coco" + render.MISSING)
    assert update["value"] == "clipcap-coco" + render.MISSING and update["choices"] == labels
    assert "coco_weights.pt" in table and "files missing" in table and "tiny test model" in table


def test_dropdowns_open_on_a_ready_model_and_follow_the_settings(tiny_models_dir):
    """A fresh install's Settings model has no files yet: the Caption and Batch dropdowns open on one
    that runs. The WebUI builds the tab once: on page load and after Settings change the model or the
    region defaults, the dropdowns and the Region's outside mode and margin must show the current
    Settings (they kept the start-up values until a restart)."""
    from captioners.regions import RegionOptions
    from captioners.ui.tab import FOLLOW_SETTINGS_ID, follow_settings

    # The Settings, changed by the test as a user would.
    current = {"model": "clipcap-coco", "region": RegionOptions()}

    def settings():
        return Settings(models_dir=tiny_models_dir, model=current["model"], device="cpu", region=current["region"])

    service = CaptionService(Host(settings))
    labels, shown = model_choices(service)
    assert shown == TINY  # ready, unlike the Settings' clipcap-coco
    assert model_choices(service, prefer_ready=False)[1] == "clipcap-coco" + render.MISSING
    blocks = build_tab(service)
    ids = {block._id: getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    order = ["captioners_models_model", "captioners_models_table", "captioners_model", "captioners_batch_model",
             "captioners_region_outside", "captioners_region_margin"]
    followers = [dep for dep in blocks.config["dependencies"]
                 if not dep["inputs"] and [ids.get(o) for o in dep["outputs"]] == order]
    assert len(followers) == 2  # the page's load, and the hidden button the page's script clicks
    assert FOLLOW_SETTINGS_ID in ids.values()
    current["model"] = TINY
    models, table, caption, batch, outside, margin = follow_settings(service)
    assert models["value"] == caption["value"] == batch["value"] == TINY and caption["choices"] == labels
    assert "tiny test model" in table
    assert (outside["value"], margin["value"]) == ("keep", 10)
    current["model"] = "clipcap-coco"
    current["region"] = RegionOptions(outside="blur", margin=0.25)
    models, _, caption, _, outside, margin = follow_settings(service)
    assert models["value"] == "clipcap-coco" + render.MISSING and caption["value"] == TINY
    assert (outside["value"], margin["value"]) == ("blur", 25)


def test_a_damaged_upload_is_named_not_a_bytesio(service):
    """gradio 3 hands the handler an image opened lazily from memory; Pillow's own message for it names
    a BytesIO object (and an unexpected OSError printed a traceback)."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    damaged = Image.open(io.BytesIO(buffer.getvalue()[:80]))  # the header, then the data cut short
    kept, status, _ = caption_image(service, damaged, TINY)
    assert kept == gr.update() and status == "Error: The image cannot be read: truncated or corrupt image."


def test_caption_handler(service, photos):
    image = Image.open(photos[0])
    judging = [False, "", "keep", 75, 0, False, ""]
    caption, status, judged = caption_image(service, image, TINY, *judging, *([None] * 13))
    assert caption == service.caption([image])[1][0] and status.startswith(TINY)
    # User errors go to the status line; the caption being edited is left alone.
    kept, status, _ = caption_image(service, None, TINY)
    assert kept == gr.update() and status == "Upload an image first."
    kept, status, _ = caption_image(service, image, "clipcap-coco" + render.MISSING)
    assert kept == gr.update() and status.startswith("Error: Missing model file") and "coco_weights.pt" in status


def test_caption_handler_scores_and_lists_several_captions(service, photos):
    image = Image.open(photos[0])
    judging = [True, "", "keep", 75, 0, False, ""]
    decoding = ["beam", -1, 0, 20, 0, 0, 0, 0, 0, 0, "", "model default", False, 3, "model default", "model", 0]
    caption, status, judged = caption_image(service, image, TINY, *judging, *decoding)
    _, results = service.judge([image], TINY, decoding_mapping(*decoding), {"score": True})
    assert caption.split("\n") == results[0].captions and len(results[0].captions) == 3
    assert f"CLIPScore {results[0].score:.3f}" in status
    assert judged.count("<tr>") == 4 and "CLIPScore" in judged
    # More models from the judging controls: their candidates are ranked with the chosen model's.
    from captioners.ui.controls import chosen_models

    assert chosen_models(TINY, [*judging[:6], f" {TINY}-b, c "]) == [TINY, f"{TINY}-b", "c"]
    assert chosen_models(TINY, judging) == TINY
    _, status, _ = caption_image(service, image, TINY, *judging[:6], "no-such-model", *decoding)
    assert status.startswith("Error:") and "no-such-model" in status


def test_decoding_controls_map_unset_to_none():
    assert decoding_mapping("model default", -1, 0, 0, 0, 0, 0, 0, 0, 0, "", "model default", False) == {}
    assert decoding_mapping("beam", 3, 4.0, 20, 2, 0.7, 0.9, 40, 1.2, 5, "a photo of", "drop", True) == {
        "strategy": "beam", "seed": 3, "num_beams": 4, "max_new_tokens": 20, "min_new_tokens": 2, "temperature": 0.7,
        "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.2, "num_candidates": 5, "prompt": "a photo of",
        "keep_prompt": False, "postprocess": False}
    assert decoding_mapping(*([None] * 13), 3, "sample", "clip", 1.5) == {
        "captions_per_image": 3, "candidates": "sample", "select": "clip", "guidance": 1.5}
    assert decoding_mapping(*([None] * 13), 0, "model default", "model", 0) == {}


def test_settings_decoding_fills_what_the_request_leaves_unset(tiny_models_dir, photos):
    from captioners.options import DecodingOptions

    beam = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu", decoding=DecodingOptions(strategy="beam"))
    greedy = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu")
    image = Image.open(photos[3])
    by_beam = CaptionService(Host(lambda: beam))
    by_greedy = CaptionService(Host(lambda: greedy))
    assert by_beam.caption([image])[1] == by_greedy.caption([image], options={"strategy": "beam"})[1]
    assert by_beam.caption([image], options={"strategy": "greedy"})[1] == by_greedy.caption([image])[1]


@pytest.mark.parametrize("after_use, stays_loaded", [("keep", True), ("offload", True), ("unload", False)])
def test_after_use(tiny_models_dir, photos, after_use, stays_loaded):
    settings = Settings(models_dir=tiny_models_dir, model=TINY, device="cpu", after_use=after_use)
    service = CaptionService(Host(lambda: settings))
    service.caption([Image.open(photos[0])])
    assert (service.loaded_model() == TINY) == stays_loaded
    assert unload_model(service) == (f"Unloaded {TINY}." if stays_loaded else "No model was loaded.")


def test_switching_models_frees_the_previous_one(service, tiny_models_dir, photos, icg_checkpoint, clip_overrides):
    from tests.webui_host import write_tiny_preset

    write_tiny_preset(tiny_models_dir, icg_checkpoint.path, clip_overrides, name="tiny-2")
    service.caption([Image.open(photos[0])])
    first = service._captioner
    service.caption([Image.open(photos[0])], model="tiny-2")
    assert not first.loaded and service.loaded_model() == "tiny-2"


def test_download_reports_offline_failure_with_the_file_and_source(service):
    lines = list(download_model(service, "clipcap-coco" + render.MISSING))
    assert "downloading" in lines[0] and "Failed: Missing model file" in lines[-1]
    assert "coco_weights.pt" in lines[-1] and "HF_HUB_OFFLINE" in lines[-1]
    assert list(download_model(service, TINY))[-1].endswith("All files present.")


def test_local_paths_saved_as_a_preset(service, tiny_models_dir, icg_checkpoint, tmp_path):
    shown = show_paths(service, "clipcap-coco" + render.MISSING)
    assert [u["visible"] for u in shown] == [True, True, True, True, False]  # no vocabulary for CLIP-prefix
    values = [str(icg_checkpoint.path), "", "", "", ""]
    message = save_paths(service, "clipcap-coco" + render.MISSING, *values)
    assert message.startswith("Saved"), message
    entries = json.loads((tiny_models_dir / "presets.json").read_text())
    assert entries["clipcap-coco"] == {"base": "clipcap-coco", "weights": str(icg_checkpoint.path)}
    assert TINY in entries, "other presets are kept"
    spec = service.spec("clipcap-coco")
    assert spec.origin == "presets file" and str(spec.config.weights.local) == str(icg_checkpoint.path.resolve())
    assert show_paths(service, "clipcap-coco")[0]["value"] == str(icg_checkpoint.path)
    assert save_paths(service, "clipcap-coco", str(tmp_path / "nope.pt"), "", "", "", "").startswith("Not saved")
    assert save_paths(service, "clipcap-coco", "", "", "", "", "").startswith("Saved")
    assert "clipcap-coco" not in json.loads((tiny_models_dir / "presets.json").read_text())


def test_broken_presets_file_is_never_overwritten(service, tiny_models_dir, icg_checkpoint):
    (tiny_models_dir / "presets.json").write_text("{ not json")
    message = save_paths(service, "clipcap-coco", str(icg_checkpoint.path), "", "", "", "")
    assert message.startswith("Not saved") and "fix or remove it" in message
    assert (tiny_models_dir / "presets.json").read_text() == "{ not json"


def test_service_refuses_empty_input(service):
    with pytest.raises(CaptionerError):
        service.caption([])


def test_render_escapes_user_text():
    html = render.pairs_table([("<img src=x onerror=alert(1)>", "a & b")], ("image", "caption"), "none")
    assert "<img" not in html and "&lt;img" in html and "a &amp; b" in html
    assert render.duration(3725) == "1:02:05" and render.duration(None) == "?"


# ---- install.py ---------------------------------------------------------------------------------
HOST_PACKAGES = ("torch", "transformers", "gradio", "protobuf", "numpy", "pillow", "tokenizers")


@pytest.mark.parametrize("missing", [(), ("open_clip",), ("open_clip", "safetensors", "huggingface_hub")])
def test_install_only_adds_what_is_missing(monkeypatch, missing):
    pip = []
    launch = types.SimpleNamespace(is_installed=lambda name: name not in missing,
                                   run_pip=lambda command, desc=None: pip.append(command))
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    assert len(pip) == len(missing)
    for command in pip:
        assert command.startswith("install ") and "==" not in command and "git" not in command
        assert "-U" not in command and "--upgrade" not in command
        requirement = command.split('"')[1]
        assert re.split(r"[<>=!~ ]", requirement)[0].lower() not in HOST_PACKAGES
        assert ' -c "' in command  # the host's installed versions held by a constraints file


def test_install_holds_the_hosts_installed_versions(monkeypatch):
    from importlib.metadata import version

    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(is_installed=lambda name: True))
    installer = runpy.run_path(str(ROOT / "install.py"))
    held = installer["host_constraints"]()
    assert f"torch=={version('torch')}" in held and f"numpy=={version('numpy')}" in held
    assert all(re.fullmatch(r"[A-Za-z_]+==\S+", line) for line in held)


def test_no_pip_at_run_time():
    for path in (ROOT / "captioners").rglob("*.py"):
        text = path.read_text()
        assert "pip install" not in text.replace("pip install 'gradio", "").replace("pip install 'ray[data]'", "") and "run_pip" not in text, path


# ---- javascript ------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_js_makes_the_tab_follow_a_settings_change_of_the_model_and_the_region():
    script = """
        var callbacks = [], clicks = 0, opts = {};
        function onOptionsChanged(callback) { callbacks.push(callback); }
        function gradioApp() { return document; }
        var document = { getElementById: function (id) {
            return id === "captioners_follow_settings" ? { click: function () { clicks += 1; } } : null; } };
    """ + (ROOT / "javascript" / "captioners.js").read_text() + """
        var counts = [];
        function changed(options) { opts = options; callbacks.forEach(function (c) { c(); }); counts.push(clicks); }
        var region = {captioners_region_outside: "keep", captioners_region_margin: 10};
        // the options arrive with the page: the tab is built for them
        changed(Object.assign({captioners_model: "a"}, region));
        changed(Object.assign({captioners_model: "a", other: 1}, region));  // another setting saved
        changed(Object.assign({}, region, {captioners_model: "b"}));  // Settings > Captioners > Model changed
        changed({captioners_model: "b", captioners_region_outside: "blur", captioners_region_margin: 10});
        changed({captioners_model: "b", captioners_region_outside: "blur", captioners_region_margin: 30});
        console.log(JSON.stringify([counts, callbacks.length]));
    """
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[0, 0, 1, 2, 3], 1]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_img2img_js_sends_the_open_subtab_and_only_the_inputs():
    script = (ROOT / "javascript" / "captioners.js").read_text() + """
        function get_tab_index(id) { if (id !== "mode_img2img") throw id; return 3; }
        // gradio passes the inputs (tab, prompt, 5 images) then the outputs' values (prompt)
        console.log(JSON.stringify(captioners_img2img_args(0, "p", "a", "b", "c", "d", "e", "p")));
    """
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [3, "p", "a", "b", "c", "d", "e"]
