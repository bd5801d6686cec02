"""img2img: caption each input image into the prompt, just before the WebUI processes it.

An always-visible img2img script (``scripts/captioners_img2img_prompt.py`` mixes
:class:`CaptionIntoPrompt` into a ``modules.scripts.Script``). How A1111 1.10, Forge, reForge and
Forge Neo run it, alike:

- ``before_process(p, *args)`` is called by ``process_images(p)`` before ``p.setup_prompts()`` turns
  ``p.prompt`` into ``p.all_prompts``, so a prompt changed there is the one every image of the run
  uses (``process`` comes too late for that). ``p.init_images`` is already set.
- The Batch sub-tab calls ``process_images`` once per input file with ONE reused ``p``: it sets
  ``p.init_images`` for each file and leaves ``p.prompt`` as the previous run left it (or rebuilds
  it from PNG info). So the prompt this script wrote is remembered on ``p``, and each file gets the
  user's prompt plus its own caption, never the captions of the files before it.
- It runs inside the generation, which holds the WebUI's queue lock (in Forge from another thread):
  the service is called with ``in_current_job=True``, so it never waits for that lock.

The caption also goes into the image's infotext (:data:`CAPTION_KEY`).

The script's arguments are one table, :data:`ARGS`: it makes the controls (in its order, which is
also the order of ``"args"`` in the API's ``alwayson_scripts``), names the infotext keys pasted back
into them, and gives the defaults for arguments an API call leaves out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gradio as gr

from captioners.batch.remote import exception_text
from captioners.errors import CaptionerError

log = logging.getLogger(__name__)

TITLE = "Captioners: caption the input into the prompt"
SETTINGS_MODEL = "Model from Settings"  # the dropdown's first entry: Settings → Captioners → Model
MODES = ("prepend", "append", "replace")
CAPTION_KEY = "Captioners caption"
MODEL_KEY = "Captioners model"
MODE_KEY = "Captioners mode"
REMEMBERED = "captioners_prompt"  # attribute on p: (the user's prompt, the prompt made from it)


@dataclass(frozen=True)
class Arg:
    """One argument of the script: its control, its place in the API's args, its infotext key."""

    name: str
    label: str
    default: Any
    kind: str                    # checkbox | model | radio | textbox
    choices: tuple[str, ...] = ()
    infotext: str | None = None  # the infotext key pasted back into the control (None: not pasted)
    info: str | None = None


# "enabled" is never pasted back: the pasted prompt already holds the caption, so captioning again
# would put a second caption into it.
ARGS: tuple[Arg, ...] = (
    Arg("enabled", "Caption each input image into the prompt", False, "checkbox",
        info="every image of a Batch run gets its own caption"),
    Arg("model", "Model", SETTINGS_MODEL, "model", infotext=MODEL_KEY),
    Arg("mode", "The caption", "prepend", "radio", MODES, infotext=MODE_KEY,
        info="goes before the prompt, after it, or replaces it"),
    Arg("separator", "Separator", ", ", "textbox", info="between the caption and the prompt"),
)


@dataclass(frozen=True)
class PromptCaption:
    """The script's argument values, checked."""

    enabled: bool = False
    model: str | None = None  # None: the Settings' model
    mode: str = "prepend"
    separator: str = ", "


def parse_args(values: Sequence[Any]) -> PromptCaption:
    """The values of :data:`ARGS` (in its order) as the UI or an API call gives them; a missing or
    None value is the argument's default, an unknown mode is the default mode."""
    given = {arg.name: (values[i] if i < len(values) and values[i] is not None else arg.default)
             for i, arg in enumerate(ARGS)}
    model = str(given["model"]).strip()
    mode = str(given["mode"]).strip().lower()
    if mode not in MODES:
        log.warning("Captioners: unknown caption mode %r, using %r", given["mode"], PromptCaption.mode)
        mode = PromptCaption.mode
    return PromptCaption(
        enabled=_truthy(given["enabled"]),
        model=None if model in ("", SETTINGS_MODEL) else model,
        mode=mode,
        separator=str(given["separator"]),
    )


def _truthy(value: Any) -> bool:
    """An API's "false" string is off, as the checkbox would be."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def combine(prompt: str, caption: str, mode: str, separator: str) -> str:
    """The prompt with the caption before it, after it, or instead of it. A separator the prompt
    already ends (or starts) with is not doubled: "oil painting," + ", " + caption."""
    mark = separator.strip()
    prompt = prompt.strip()
    if mode == "replace" or not prompt:
        return caption
    if mode == "append":
        return (prompt.rstrip(mark).rstrip() if mark else prompt) + separator + caption
    return caption + separator + (prompt.lstrip(mark).lstrip() if mark else prompt)


# ---- the script -------------------------------------------------------------------------------------
class CaptionIntoPrompt:
    """The script's methods, mixed into a ``modules.scripts.Script`` by the thin file in ``scripts/``.

    Each call looks up the running Extension, so the script shares its one service (one loaded model)
    with the tab, the 💬 button and the API, and follows a Reload UI.
    """

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        from modules import scripts

        return scripts.AlwaysVisible if is_img2img else False

    def ui(self, is_img2img: bool) -> list[Any]:
        controls = build_controls(self.elem_id, _extension().model_ids)  # type: ignore[attr-defined]
        # Read by the WebUI to paste an image's infotext back into these controls.
        self.infotext_fields = [(controls[arg.name], arg.infotext) for arg in ARGS if arg.infotext]
        self.paste_field_names = [arg.infotext for arg in ARGS if arg.infotext]
        return [controls[arg.name] for arg in ARGS]

    def before_process(self, p: Any, *args: Any) -> None:
        caption_into_prompt(p, parse_args(args), _extension().service)


def _extension() -> Any:
    from captioners.webui.extension import Extension

    return Extension.running()


def build_controls(elem_id: Callable[[str], str], model_ids: Callable[[], list[str]]) -> dict[str, Any]:
    """A control per row of :data:`ARGS`, named by the row, inside an accordion (closed: off by default)."""
    controls: dict[str, Any] = {}
    with gr.Accordion(TITLE, open=False, elem_id=elem_id("accordion")):
        for arg in ARGS:
            controls[arg.name] = _control(arg, elem_id(arg.name), model_ids)
    return controls


def _control(arg: Arg, elem_id: str, model_ids: Callable[[], list[str]]) -> Any:
    hint = {"info": arg.info} if arg.info else {}
    if arg.kind == "checkbox":
        return gr.Checkbox(value=arg.default, label=arg.label, elem_id=elem_id, **hint)
    if arg.kind == "radio":
        return gr.Radio(list(arg.choices), value=arg.default, label=arg.label, elem_id=elem_id, **hint)
    if arg.kind == "model":
        return gr.Dropdown([SETTINGS_MODEL, *_model_choices(model_ids)], value=arg.default, label=arg.label,
                           elem_id=elem_id, **hint)
    return gr.Textbox(value=arg.default, label=arg.label, elem_id=elem_id, **hint)


def _model_choices(model_ids: Callable[[], list[str]]) -> list[str]:
    try:
        return [model for model in model_ids() if model != SETTINGS_MODEL]
    except Exception:  # a broken models folder must not take the img2img tab down
        log.exception("Captioners: cannot list models for the img2img script")
        return []


# ---- captioning into the prompt ---------------------------------------------------------------------
def caption_into_prompt(p: Any, args: PromptCaption, service: Any) -> None:
    """Caption ``p``'s input image and put the caption into ``p.prompt`` (and its infotext).

    A user's mistake (missing model files, a damaged image) is one log line and a comment of the
    run (the WebUI shows those under the result), and the image is processed with the user's own prompt.
    """
    if not args.enabled:
        return
    for key in (CAPTION_KEY, MODEL_KEY, MODE_KEY):  # left by the previous file of a Batch run
        p.extra_generation_params.pop(key, None)
    base = _users_prompt(p)
    p.prompt = base
    image = _input_image(p)
    if image is None:
        _tell(p, "Captioners: no input image to caption; the prompt is left as it is")
        return
    try:
        model_id, captions = service.caption([image], args.model, in_current_job=True)
    except CaptionerError as exc:
        _tell(p, f"Captioners: no caption for the prompt: {exception_text(exc)}")
        return
    caption = captions[0].strip()
    if not caption:
        return
    prompt = _apply(base, caption, args)
    p.prompt = prompt
    setattr(p, REMEMBERED, (base, prompt))
    p.extra_generation_params.update({CAPTION_KEY: caption, MODEL_KEY: model_id, MODE_KEY: args.mode})
    log.info("Captioners: caption for the prompt: %s", caption)


def _tell(p: Any, message: str) -> None:
    """One log line, and a comment of the run where the host keeps them (A1111, Forge, reForge show
    ``p.comment`` texts under the result): the user sees why the prompt has no caption."""
    log.warning("%s", message)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(message)


def _users_prompt(p: Any) -> Any:
    """The prompt before this script changed it: a Batch run hands the same ``p`` back with the
    prompt made for the previous file, unless the WebUI set a new one since (PNG info)."""
    remembered = getattr(p, REMEMBERED, None)
    if remembered is not None and p.prompt == remembered[1]:
        return remembered[0]
    return p.prompt


def _apply(base: Any, caption: str, args: PromptCaption) -> Any:
    """``p.prompt`` may be a list (one prompt per image, from the API): each gets the caption."""
    if isinstance(base, list):
        return [combine(str(item or ""), caption, args.mode, args.separator) for item in base]
    return combine(str(base or ""), caption, args.mode, args.separator)


def _input_image(p: Any) -> Any:
    """The image img2img processes. The WebUI repeats one image for a batch of several; several
    different ones (the API's init_images) share the first one's caption."""
    images = getattr(p, "init_images", None) or []
    image = images[0] if images else None
    if image is None:
        return None
    return image if image.mode == "RGB" else image.convert("RGB")  # img2img images are RGBA
