"""A caption button beside img2img's built-in interrogate buttons (📎 📦).

It captions the image of whichever img2img sub-tab is open (img2img, sketch, inpaint, inpaint
sketch, inpaint upload) with the model chosen in Settings, and writes the caption into the prompt.
In A1111 and reForge the images are ``gr.Image`` components; in Forge each of the first four is a
``ForgeCanvas`` whose ``gr.HTML`` carries the elem_id and whose image is the next component with
class ``logical_image_background``. The open sub-tab's index comes from the page
(``javascript/captioners.js``), as for the built-in buttons.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import gradio as gr

from captioners.errors import CaptionerError
from captioners.ui.compat import js, warn

log = logging.getLogger(__name__)

# In the order of img2img's sub-tabs (the index the page reports).
SOURCES = ("img2img_image", "img2img_sketch", "img2maskimg", "inpaint_sketch", "img_inpaint_base")
PROMPT = "img2img_prompt"
ANCHOR = "deepbooru"  # the button goes right after 📦, in the same row
LAST_CHANCE = "img2img_batch_input_dir"  # created after every source: wire even if one was missing
BUTTON_ID = "captioners_img2img_caption"
JS_FUNCTION = "captioners_img2img_args"


def combine(prompt: str | None, caption: str, mode: str) -> str:
    """The new prompt: the caption replaces it, or joins it with a comma."""
    prompt = (prompt or "").strip().rstrip(",").strip()
    if mode == "append" and prompt:
        return f"{prompt}, {caption}"
    if mode == "prepend" and prompt:
        return f"{caption}, {prompt}"
    return caption


def pick_image(tab: Any, images: tuple[Any, ...]) -> Any:
    """The image of sub-tab ``tab``; inpaint's gradio-3 value is a dict with the image and its mask."""
    try:
        index = int(tab)
    except (TypeError, ValueError):
        index = 0
    if not 0 <= index < len(images):
        return None
    image = images[index]
    if isinstance(image, dict):  # gradio 3 sketch tool {"image", "mask"}; gradio 4 editor {"background", ...}
        image = image.get("image") or image.get("background") or image.get("composite")
    return image


class Img2ImgButton:
    """Collects img2img's components as the WebUI creates them, then wires the button once."""

    def __init__(self, caption: Callable[[Any], str], prompt_mode: Callable[[], str]):
        self.caption = caption
        self.prompt_mode = prompt_mode
        self.button: Any = None
        self.tab_index: Any = None
        self.prompt: Any = None
        self.sources: dict[str, Any] = {}
        self.awaiting_canvas: str | None = None
        self.wired = False

    def on_component(self, component: Any, kwargs: dict[str, Any]) -> None:
        """``on_after_component`` callback: sees every component of the UI as it is created."""
        if self.wired:
            return
        elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
        classes = kwargs.get("elem_classes") or getattr(component, "elem_classes", None) or []
        if isinstance(classes, str):
            classes = [classes]
        if elem_id == PROMPT:
            self.prompt = component
        elif elem_id == ANCHOR and self.button is None:
            self._create_button()
        elif elem_id in SOURCES:
            if isinstance(component, gr.HTML):  # Forge's canvas: its image follows
                self.awaiting_canvas = elem_id
            else:
                self.sources[elem_id] = component
        elif self.awaiting_canvas and "logical_image_background" in classes:
            self.sources[self.awaiting_canvas] = component
            self.awaiting_canvas = None
        if len(self.sources) == len(SOURCES) or (elem_id == LAST_CHANCE and self.sources):
            self._wire()

    def _create_button(self) -> None:
        from modules.ui_components import ToolButton

        self.button = ToolButton("💬", elem_id=BUTTON_ID, tooltip="Caption the image with Captioners "
                                                                   "(model and prompt mode: Settings → Captioners)")
        # Replaced in the page by the open sub-tab's index (javascript/captioners.js).
        self.tab_index = gr.Number(value=0, visible=False, elem_id=f"{BUTTON_ID}_tab")

    def _wire(self) -> None:
        if self.button is None or self.prompt is None:
            log.warning("Captioners: img2img caption button not added (no %s / interrogate buttons found).", PROMPT)
            self.wired = True
            return
        missing = [name for name in SOURCES if name not in self.sources]
        if missing:
            log.warning("Captioners: img2img caption button cannot see %s", ", ".join(missing))
        placeholders = {name: gr.State(None) for name in missing}
        inputs = [self.tab_index, self.prompt, *(self.sources.get(name) or placeholders[name] for name in SOURCES)]
        self.button.click(self.run, inputs=inputs, outputs=[self.prompt], **js(JS_FUNCTION))
        self.wired = True

    def run(self, tab: Any, prompt: str, *images: Any) -> Any:
        """The new prompt; the prompt unchanged (and a warning in the page) after a user's mistake."""
        image = pick_image(tab, images)
        if image is None:
            return refuse(NO_IMAGE)
        try:
            caption = self.caption(image)
        except CaptionerError as exc:  # missing model files, a damaged image: the user can fix these
            return refuse(str(exc))
        except Exception as exc:
            from captioners.ui.controls import user_error

            raise user_error(exc) from None  # unexpected: logged with its traceback
        return combine(prompt, caption, self.prompt_mode())


NO_IMAGE = "No image in the open img2img tab. (For a folder, use the Captioners tab → Batch.)"


def refuse(message: str) -> Any:
    """One console line and a warning in the page, the prompt left as it is. Raising gr.Error would
    also tell the page, but gradio 3 and 4 print a 25-line traceback for every raised error."""
    log.warning("Captioners: %s", message.splitlines()[0])
    warn(message)
    return gr.update()
