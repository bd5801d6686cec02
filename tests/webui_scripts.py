"""Helpers for the tests of the extension's WebUI scripts (the img2img prompt script, caption on save):
load the extension's script files into the stand-in WebUI as the WebUI does, build the img2img
scripts' controls, and make processing objects."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import gradio as gr

from tests.webui_host import TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TIMEOUT_S = 120  # a deadlock fails the test instead of hanging the run


def load_extension(webui, *files: str) -> SimpleNamespace:
    """Load scripts/captioners_webui.py and then ``files`` of scripts/, register the settings (with
    the tiny model chosen), and build img2img's always-visible scripts' controls."""
    from modules import scripts

    main = scripts.load_script_file(str(SCRIPTS / "captioners_webui.py"))
    modules = [scripts.load_script_file(str(SCRIPTS / name)) for name in files]
    webui.script_callbacks.ui_settings_callback()
    webui.shared.opts.set("captioners_model", TINY)
    runner = scripts.scripts_img2img
    runner.initialize_scripts(True)
    with gr.Blocks():
        runner.setup_ui()
    return SimpleNamespace(extension=main.extension, runner=runner, modules=modules, scripts=scripts)


def script_args(runner, script, values: list[Any] | None = None) -> list[Any]:
    """``p.script_args`` as the page sends them: every control's value, ``values`` for ``script``'s."""
    args = [0] + [getattr(control, "value", None) for control in runner.inputs[1:]]
    for offset, value in enumerate(values or []):
        args[script.args_from + offset] = value
    return args


def img2img_p(runner, tmp_path: Path, prompt: str, images: list[Any] | None, args: list[Any] | None = None,
              script=None, **kwargs):
    from modules.processing import StableDiffusionProcessingImg2Img

    p = StableDiffusionProcessingImg2Img(prompt=prompt, init_images=images, outpath_samples=str(tmp_path / "samples"),
                                         outpath_grids=str(tmp_path / "grids"), **kwargs)
    p.scripts = runner
    p.script_args = script_args(runner, script or runner.alwayson_scripts[0], args)
    return p


def within(timeout_s: float, func: Callable[[], Any]) -> Any:
    """Run ``func`` in a thread; fail (not hang) when it has not returned after ``timeout_s``."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = func()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, daemon=True, name="test-generation")
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still running after {timeout_s} s: a deadlock on the queue lock?"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


class StubService:
    """Stands in for the CaptionService: fixed captions, and records how it was called."""

    def __init__(self, captions: list[str] | None = None, error: BaseException | None = None):
        self.captions = captions or ["a red bus on a street"]
        self.error = error
        self.calls: list[dict[str, Any]] = []

    def caption(self, images, model=None, options=None, *, in_current_job=False):
        self.calls.append({"images": list(images), "model": model, "in_current_job": in_current_job})
        if self.error is not None:
            raise self.error
        return model or TINY, [self.captions[(len(self.calls) - 1) % len(self.captions)]]
