"""img2img's "Captioners: caption the input into the prompt" script, in the stand-in WebUI."""

from __future__ import annotations

import ast
import logging
import threading

import gradio as gr
import pytest
from PIL import Image

from captioners.errors import CaptionerError
from captioners.webui import prompt_script
from captioners.webui.prompt_script import (ARGS, CAPTION_KEY, MODE_KEY, MODEL_KEY, SETTINGS_MODEL, TITLE,
                                            PromptCaption, combine, parse_args)
from tests.webui_host import TINY
from tests.webui_scripts import SCRIPTS, TIMEOUT_S, StubService, img2img_p, load_extension, within

SCRIPT_FILE = "captioners_img2img_prompt.py"
any_host = pytest.mark.parametrize("webui", ["a1111"], indirect=True)


@pytest.fixture()
def loaded(webui):
    return load_extension(webui, SCRIPT_FILE)


def ours(runner):
    [script] = [s for s in runner.alwayson_scripts if s.title() == TITLE]
    return script


def rgba(photo):
    return Image.open(photo).convert("RGBA")  # the img2img tab's images are RGBA


def infotext_params(infotext: str) -> str:
    return infotext.strip().split("\n")[-1]


# ---- the script file and its controls ---------------------------------------------------------------
def test_script_file_is_thin_and_imports_only_the_adapter():
    source = (SCRIPTS / SCRIPT_FILE).read_text()
    assert len(source.splitlines()) <= 25
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert imported == {"modules", "captioners.webui.prompt_script"}


def test_section_is_in_img2img_only_with_a_control_per_argument(webui, loaded):
    from modules import scripts

    script = ours(loaded.runner)
    assert script.show(True) is scripts.AlwaysVisible and script.show(False) is False
    assert loaded.runner.inputs[script.args_from:script.args_to] == script.controls
    assert [c.elem_id for c in script.controls] == [
        f"script_captioners_caption_the_input_into_the_prompt_{arg.name}" for arg in ARGS]
    enabled, model, mode, separator = script.controls
    assert isinstance(enabled, gr.Checkbox) and enabled.value is False  # off by default
    assert isinstance(model, gr.Dropdown) and model.value == SETTINGS_MODEL
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in model.choices]
    assert choices[0] == SETTINGS_MODEL and TINY in choices
    assert isinstance(mode, gr.Radio) and mode.value == "prepend"
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in mode.choices] == ["prepend", "append", "replace"]
    assert isinstance(separator, gr.Textbox) and separator.value == ", "
    # Pasting an infotext sets the model and the mode, never "enabled" (the prompt holds the caption).
    assert [(c.elem_id, key) for c, key in script.infotext_fields] == [(model.elem_id, MODEL_KEY),
                                                                       (mode.elem_id, MODE_KEY)]
    assert script.paste_field_names == [MODEL_KEY, MODE_KEY]
    assert loaded.runner.infotext_fields == script.infotext_fields
    assert webui.script_callbacks.errors == [] and loaded.scripts.errors == []


@any_host
def test_ui_survives_a_broken_models_folder(webui, loaded, monkeypatch, caplog):
    def broken():
        raise OSError("presets.json: permission denied")

    monkeypatch.setattr(loaded.extension, "model_ids", broken)
    with gr.Blocks(), caplog.at_level(logging.ERROR):
        controls = prompt_script.build_controls(lambda name: f"x_{name}", loaded.extension.model_ids)
    assert controls["model"].value == SETTINGS_MODEL
    assert "cannot list models" in caplog.text


# ---- the arguments: one table for the UI, the API and the infotext -----------------------------------
def test_arguments_follow_the_table():
    assert [arg.name for arg in ARGS] == ["enabled", "model", "mode", "separator"]
    assert parse_args([]) == PromptCaption()  # an API call may leave every argument out
    assert parse_args([True]) == PromptCaption(enabled=True)
    assert parse_args(["true", TINY, "APPEND", " | "]) == PromptCaption(True, TINY, "append", " | ")
    assert parse_args(["false", SETTINGS_MODEL, None, None]) == PromptCaption()
    assert parse_args([1, "", "replace"]).model is None  # "" or the Settings entry: the Settings' model


def test_unknown_mode_is_the_default_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_args([True, None, "sideways"]).mode == "prepend"
    assert "sideways" in caplog.text


@pytest.mark.parametrize(("prompt", "mode", "separator", "expected"), [
    ("oil painting", "prepend", ", ", "a dog, oil painting"),
    ("oil painting", "append", ", ", "oil painting, a dog"),
    ("oil painting", "replace", ", ", "a dog"),
    ("oil painting, ", "append", ", ", "oil painting, a dog"),  # the prompt's own comma is not doubled
    (", oil painting", "prepend", ", ", "a dog, oil painting"),
    ("  ", "append", ", ", "a dog"),                              # no prompt: the caption alone
    ("style", "append", " BREAK ", "style BREAK a dog"),
    ("style", "prepend", "", "a dogstyle"),                       # the separator is the user's
])
def test_combine(prompt, mode, separator, expected):
    assert combine(prompt, "a dog", mode, separator) == expected


# ---- captioning into the prompt ---------------------------------------------------------------------
def test_off_by_default_changes_nothing(webui, loaded, tmp_path, photos):
    script = ours(loaded.runner)
    p = img2img_p(loaded.runner, tmp_path, "oil painting", [rgba(photos[0])], script=script)
    processed = webui_img2img(webui, p)
    assert processed.all_prompts == ["oil painting"]
    assert CAPTION_KEY not in processed.infotexts[0]
    assert loaded.extension.service.loaded_model() is None  # no model was loaded for nothing


@pytest.mark.parametrize("mode", ["prepend", "append", "replace"])
def test_caption_goes_into_the_prompt_and_the_infotext(webui, loaded, tmp_path, photos, mode):
    script = ours(loaded.runner)
    photo = rgba(photos[0])
    expected = loaded.extension.service.caption([photo.convert("RGB")])[1][0]
    p = img2img_p(loaded.runner, tmp_path, "oil painting", [photo], [True, SETTINGS_MODEL, mode, ", "],
                  script=script, batch_size=2)
    processed = webui_img2img(webui, p)
    prompt = combine("oil painting", expected, mode, ", ")
    assert processed.all_prompts == [prompt, prompt]  # every image of the batch
    for infotext in processed.infotexts:
        assert infotext.startswith(prompt + "\n")
        params = infotext_params(infotext)
        assert f"{CAPTION_KEY}: " in params and expected in params
        assert f"{MODEL_KEY}: {TINY}" in params and f"{MODE_KEY}: {mode}" in params
    assert loaded.scripts.errors == [] and webui.script_callbacks.errors == []


def test_batch_tab_gives_each_file_its_own_caption(webui, loaded, tmp_path, photos):
    """A1111's Batch sub-tab reuses one p: the second file must not get the first file's caption too."""
    script = ours(loaded.runner)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        Image.open(photos[i]).convert("RGB").save(folder / f"{i}.png")
    stub = StubService(["first caption", "second, caption", "third caption"])
    loaded.extension.service = stub
    p = img2img_p(loaded.runner, tmp_path, "oil painting", None, [True, TINY, "append", ", "], script=script)
    processed = webui_img2img(webui, p, batch_input_dir=str(folder))
    assert len(processed.images) == 3 and len(stub.calls) == 3
    assert [call["model"] for call in stub.calls] == [TINY] * 3
    assert all(call["in_current_job"] for call in stub.calls)
    assert all(call["images"][0].mode == "RGB" for call in stub.calls)
    prompts = [infotext.split("\n")[0] for infotext in processed.infotexts]
    assert prompts == ["oil painting, first caption", "oil painting, second, caption", "oil painting, third caption"]
    params = [infotext_params(infotext) for infotext in processed.infotexts]
    assert f'{CAPTION_KEY}: "second, caption"' in params[1]  # quoted as the WebUI quotes values
    assert "first caption" not in params[1] + params[2]


@any_host
def test_batch_with_png_info_captions_the_prompt_the_webui_rebuilt(webui, loaded, tmp_path, photos):
    """With "Append PNG info", the WebUI rebuilds p.prompt for each file: the caption joins that one."""
    from PIL import PngImagePlugin

    script = ours(loaded.runner)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, words in enumerate(["red", "blue"]):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"{words} sky\nSteps: 20, Seed: 1, Size: 64x64")
        Image.open(photos[i]).convert("RGB").save(folder / f"{i}.png", pnginfo=info)
    loaded.extension.service = StubService(["cap one", "cap two"])
    p = img2img_p(loaded.runner, tmp_path, "style", None, [True, None, "prepend", ", "], script=script)
    processed = webui_img2img(webui, p, batch_input_dir=str(folder), use_png_info=True)
    assert [t.split("\n")[0] for t in processed.infotexts] == ["cap one, style red sky", "cap two, style blue sky"]


@any_host
def test_a_users_mistake_is_one_line_and_the_image_is_still_made(webui, loaded, tmp_path, photos, caplog):
    script = ours(loaded.runner)
    p = img2img_p(loaded.runner, tmp_path, "oil painting", [rgba(photos[0])],
                  [True, "clipcap-coco", "replace", ", "], script=script)  # its files are missing
    with caplog.at_level(logging.INFO, logger="captioners"):  # a CLI test may have set its level
        processed = webui_img2img(webui, p)
    assert processed.all_prompts == ["oil painting"] and len(processed.images) == 1
    assert CAPTION_KEY not in processed.infotexts[0]
    lines = [r for r in caplog.records if r.name.startswith("captioners") and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage() and not lines[0].exc_info
    assert loaded.scripts.errors == []
    # The whole reason (which files are missing, where they go), and shown under the result too.
    message = lines[0].getMessage()
    assert not message.endswith(":") and "clipcap-coco" in message and processed.comments == message + "\n"


@any_host
def test_a_failed_file_of_a_batch_keeps_the_users_prompt(webui, loaded, tmp_path, photos):
    """After a file whose caption failed, neither its infotext nor its prompt holds the previous caption."""
    script = ours(loaded.runner)
    stub = StubService(["first caption"])
    loaded.extension.service = stub
    p = img2img_p(loaded.runner, tmp_path, "style", [rgba(photos[0])], [True, None, "append", ", "], script=script)
    webui_img2img(webui, p)
    assert p.prompt == "style, first caption"
    stub.error = CaptionerError("The image cannot be read: truncated.")
    p.init_images = [rgba(photos[1])]
    processed = webui_img2img(webui, p)
    assert processed.all_prompts == ["style"] and CAPTION_KEY not in processed.infotexts[0]


@any_host
def test_no_input_image_is_one_warning(webui, loaded, tmp_path, caplog):
    stub = StubService()
    p = img2img_p(loaded.runner, tmp_path, "style", [None], [True], script=ours(loaded.runner))
    with caplog.at_level(logging.WARNING):
        prompt_script.caption_into_prompt(p, parse_args(p.script_args[1:]), stub)
    assert stub.calls == [] and p.prompt == "style" and "no input image" in caplog.text


@any_host
def test_a_list_of_prompts_gets_the_caption_each(webui, loaded, tmp_path, photos):
    p = img2img_p(loaded.runner, tmp_path, ["a", "b"], [rgba(photos[0])], script=ours(loaded.runner))
    prompt_script.caption_into_prompt(p, PromptCaption(enabled=True, mode="append"), StubService(["cap"]))
    assert p.prompt == ["a, cap", "b, cap"]


# ---- under the generation's queue lock --------------------------------------------------------------
def webui_img2img(webui, p, **kwargs):
    """The Generate button: the WebUI's queue lock, a WebUI job, in Forge its main thread; bounded in time."""
    import importlib

    img2img = importlib.import_module("modules.img2img")
    return within(TIMEOUT_S, lambda: img2img.img2img(p, **kwargs))


def test_captioning_inside_a_generation_never_waits_for_its_lock(webui, loaded, tmp_path, photos):
    """The generation holds the queue lock (in Forge on another thread than the script's): the
    script's caption must neither take that lock again nor end or clobber the generation's job."""
    state, lock = webui.shared.state, webui.call_queue.queue_lock
    script = ours(loaded.runner)
    threads = []
    service = loaded.extension.service
    original = service.caption

    def spying_caption(*args, **kwargs):
        threads.append(threading.current_thread().name)
        assert lock.locked() and state.job == "img2img"
        return original(*args, **kwargs)

    service.caption = spying_caption
    before, history = lock.acquisitions, len(state.history)
    p = img2img_p(loaded.runner, tmp_path, "style", [rgba(photos[0])], [True, None, "replace", ", "], script=script)
    processed = webui_img2img(webui, p)
    assert CAPTION_KEY in processed.infotexts[0]
    assert lock.acquisitions == before + 1 and not lock.locked()  # the generation's own, once
    assert state.history[history:] == [("begin", "img2img"), ("end", "img2img")]  # no job of ours in it
    expected_thread = "forge-main-thread" if webui.host != "a1111" else "test-generation"
    assert threads == [expected_thread]


@any_host
def test_a_job_of_its_own_would_wait_for_the_generation(webui, loaded, photos):
    """The control case: outside ``in_current_job`` the service waits for the queue lock."""
    lock, service = webui.call_queue.queue_lock, loaded.extension.service
    done = threading.Event()
    with lock:
        worker = threading.Thread(target=lambda: (service.caption([Image.open(photos[0])]), done.set()), daemon=True)
        worker.start()
        assert not done.wait(1.0)
    worker.join(TIMEOUT_S)
    assert done.is_set()
