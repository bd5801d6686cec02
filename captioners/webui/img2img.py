"""A caption button beside img2img's built-in interrogate buttons (📎 📦); in Forge Neo, which has none,
at the end of the same tools row.

It captions the image of whichever img2img sub-tab is open (img2img, sketch, inpaint, inpaint
sketch, inpaint upload) with the model chosen in Settings, and writes the caption into the prompt.
In A1111 and reForge the images are ``gr.Image`` components; in Forge each of the first four is a
``ForgeCanvas`` whose ``gr.HTML`` carries the elem_id and whose image is the next component with
class ``logical_image_background``. The open sub-tab's index comes from the page
(``javascript/captioners.js``), as for the built-in buttons.

A second button beside it captions only the masked area of the Inpaint, Inpaint sketch and Inpaint
upload sub-tabs (see :mod:`captioners.regions` for the crop), read as the WebUI itself reads each:

========================  =========================================  ====================================
sub-tab                   A1111 / reForge (gradio 3 ``gr.Image``)     Forge / Forge Neo (``ForgeCanvas``)
========================  =========================================  ====================================
Inpaint (img2maskimg)     value ``{"image", "mask"}``                  background; mask = foreground alpha
Inpaint sketch            image vs. the ``gr.State`` made right after  background + foreground; mask =
                          it (the image before drawing): the pixels   foreground alpha
                          that differ
Inpaint upload            ``img_inpaint_base`` + ``img_inpaint_mask``  the same two ``gr.Image``
========================  =========================================  ====================================

Masks follow the WebUI's rule (opaque where transparent pixels exist, else bright), and the page
reports "Inpaint not masked" (``img2img_mask_mode``), which turns the region into the unmasked area.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import gradio as gr

from captioners.errors import CaptionerError
from captioners.regions import (EmptyMaskError, RegionOptions, alpha_mask, composite_layer, crop_region,
                                editor_value, sketch_mask)
from captioners.ui.compat import js, warn

log = logging.getLogger(__name__)

# In the order of img2img's sub-tabs (the index the page reports).
SOURCES = ("img2img_image", "img2img_sketch", "img2maskimg", "inpaint_sketch", "img_inpaint_base")
PROMPT = "img2img_prompt"
# The buttons go into img2img's tools row: right after 📦 (A1111, Forge, reForge); Forge Neo has no
# interrogate buttons, so there after its last tool, the hidden 🌀, which every WebUI makes after 📦
# (so where 📦 exists the buttons are already made when it comes).
ANCHORS = ("deepbooru", "img2img_restore_progress")
LAST_CHANCE = "img2img_batch_input_dir"  # created after every source: wire even if one was missing
BUTTON_ID = "captioners_img2img_caption"
JS_FUNCTION = "captioners_img2img_args"
# The masked-area button: the sub-tabs it reads (by index) and the components it needs besides.
REGION_BUTTON_ID = "captioners_img2img_caption_region"
REGION_JS_FUNCTION = "captioners_img2img_region_args"
INPAINT, INPAINT_SKETCH, INPAINT_UPLOAD = 2, 3, 4
UPLOAD_MASK = "img_inpaint_mask"  # Inpaint upload's mask, created right after img_inpaint_base


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


class RegionRefused(CaptionerError):
    """The open sub-tab has no masked area to caption (a user's mistake, told in the page)."""


def pick_region(tab: Any, values: tuple[Any, ...], canvases: set[str]) -> tuple[Any, Any]:
    """(image, mask) of the open inpaint sub-tab, read as the WebUI reads it (see the module's table).

    ``values``: Inpaint's image and its layer, Inpaint sketch's image and its layer (Forge) or its
    image before drawing (A1111), Inpaint upload's image and mask. ``canvases``: the sub-tabs that are
    Forge canvases. The mask is a PIL image or a bool array.
    """
    inpaint, inpaint_layer, sketch, sketch_extra, upload, upload_mask = values
    index = _index(tab)
    if index == INPAINT:
        if "img2maskimg" in canvases:
            image, mask = inpaint, None if inpaint_layer is None else alpha_mask(inpaint_layer)
        else:
            image, mask = editor_value(inpaint)
    elif index == INPAINT_SKETCH:
        if sketch is None:
            raise RegionRefused(NO_IMAGE)
        if "inpaint_sketch" in canvases:
            layer = sketch_extra
            image = sketch if layer is None else composite_layer(sketch, layer)
            mask = None if layer is None else alpha_mask(layer)
        else:  # as A1111: with no image before drawing known, nothing counts as drawn
            image, mask = sketch, sketch_mask(sketch, sketch_extra if sketch_extra is not None else sketch)
    elif index == INPAINT_UPLOAD:
        image, mask = upload, upload_mask
    else:
        raise RegionRefused(NOT_INPAINT)
    if image is None:
        raise RegionRefused(NO_IMAGE)
    if mask is None:
        raise RegionRefused(NO_MASK)
    return image, mask


def _index(tab: Any) -> int:
    try:
        return int(tab)
    except (TypeError, ValueError):
        return 0


class Img2ImgButton:
    """Collects img2img's components as the WebUI creates them, then wires the buttons once."""

    def __init__(self, caption: Callable[[Any], str], prompt_mode: Callable[[], str],
                 region_options: Callable[[], RegionOptions] | None = None):
        self.caption = caption
        self.prompt_mode = prompt_mode
        self.region_options = region_options or _settings_region
        self.button: Any = None
        self.region_button: Any = None
        self.tab_index: Any = None
        self.mask_mode: Any = None
        self.prompt: Any = None
        self.sources: dict[str, Any] = {}
        self.layers: dict[str, Any] = {}  # Forge: a canvas's foreground (its strokes)
        self.canvases: set[str] = set()
        self.sketch_original: Any = None  # A1111: Inpaint sketch's image before drawing (a gr.State)
        self.upload_mask: Any = None
        self.awaiting_canvas: str | None = None
        self.awaiting_original = False
        self.wired = False

    def on_component(self, component: Any, kwargs: dict[str, Any]) -> None:
        """``on_after_component`` callback: sees every component of the UI as it is created."""
        if self.wired:
            return
        elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
        classes = kwargs.get("elem_classes") or getattr(component, "elem_classes", None) or []
        if isinstance(classes, str):
            classes = [classes]
        if self.awaiting_original:  # A1111 makes Inpaint sketch's gr.State right after its image
            self.awaiting_original = False
            if isinstance(component, gr.State):
                self.sketch_original = component
        if elem_id == PROMPT:
            self.prompt = component
        elif elem_id in ANCHORS and self.button is None:
            self._create_button()
        elif elem_id in SOURCES:
            if isinstance(component, gr.HTML):  # Forge's canvas: its strokes, then its image follow
                self.awaiting_canvas = elem_id
                self.canvases.add(elem_id)
            else:
                self.sources[elem_id] = component
                self.awaiting_original = elem_id == "inpaint_sketch"
        elif elem_id == UPLOAD_MASK:
            self.upload_mask = component
        elif self.awaiting_canvas and "logical_image_foreground" in classes:
            self.layers[self.awaiting_canvas] = component
        elif self.awaiting_canvas and "logical_image_background" in classes:
            self.sources[self.awaiting_canvas] = component
            self.awaiting_canvas = None
        complete = len(self.sources) == len(SOURCES) and self.upload_mask is not None
        if complete or (elem_id == LAST_CHANCE and self.sources):
            self._wire()

    def _create_button(self) -> None:
        from modules.ui_components import ToolButton

        self.button = ToolButton("💬", elem_id=BUTTON_ID, tooltip="Caption the image with Captioners "
                                                                   "(model and prompt mode: Settings → Captioners)")
        self.region_button = ToolButton("🎯", elem_id=REGION_BUTTON_ID,
                                        tooltip="Caption only the masked area (Inpaint tabs) with Captioners "
                                                "(outside the mask and margin: Settings → Captioners)")
        # Replaced in the page by the open sub-tab's index and the Mask mode (javascript/captioners.js).
        self.tab_index = gr.Number(value=0, visible=False, elem_id=f"{BUTTON_ID}_tab")
        self.mask_mode = gr.Number(value=0, visible=False, elem_id=f"{REGION_BUTTON_ID}_mask_mode")

    def _wire(self) -> None:
        self.wired = True  # first: the placeholders made below are components too, and come back here
        if self.button is None or self.prompt is None:
            log.warning("Captioners: img2img caption button not added (no %s / tools row found).", PROMPT)
            return
        missing = [name for name in SOURCES if name not in self.sources]
        if missing:
            log.warning("Captioners: img2img caption button cannot see %s", ", ".join(missing))
        placeholders = {name: gr.State(None) for name in missing}
        inputs = [self.tab_index, self.prompt, *(self.sources.get(name) or placeholders[name] for name in SOURCES)]
        self.button.click(self.run, inputs=inputs, outputs=[self.prompt], **js(JS_FUNCTION))
        self._wire_region()

    def region_inputs(self) -> list[Any]:
        """The region button's inputs: sub-tab, mask mode, prompt, then the values of :func:`pick_region`."""
        sketch_extra = self.layers.get("inpaint_sketch", self.sketch_original)  # Forge's layer, A1111's State
        wanted = {
            "inpaint": self.sources.get("img2maskimg"), "inpaint layer": self.layers.get("img2maskimg"),
            "inpaint sketch": self.sources.get("inpaint_sketch"), "inpaint sketch layer": sketch_extra,
            "inpaint upload": self.sources.get("img_inpaint_base"), "inpaint upload mask": self.upload_mask,
        }
        needed = {"inpaint", "inpaint sketch", "inpaint sketch layer", "inpaint upload", "inpaint upload mask"}
        needed |= {"inpaint layer"} if "img2maskimg" in self.canvases else set()  # A1111: in the value
        missing = [name for name in needed if wanted[name] is None]
        if missing:
            log.warning("Captioners: the masked-area button cannot see %s", ", ".join(sorted(missing)))
        return [self.tab_index, self.mask_mode, self.prompt,
                *(component if component is not None else gr.State(None) for component in wanted.values())]

    def _wire_region(self) -> None:
        self.region_button.click(self.run_region, inputs=self.region_inputs(), outputs=[self.prompt],
                                 **js(REGION_JS_FUNCTION))

    def run(self, tab: Any, prompt: str, *images: Any) -> Any:
        """The new prompt; the prompt unchanged (and a warning in the page) after a user's mistake."""
        image = pick_image(tab, images)
        if image is None:
            return refuse(NO_IMAGE)
        return self._into_prompt(prompt, image)

    def _into_prompt(self, prompt: str, image: Any) -> Any:
        try:
            caption = self.caption(image)
        except CaptionerError as exc:  # missing model files, a damaged image: the user can fix these
            return refuse(str(exc))
        except Exception as exc:
            from captioners.ui.controls import user_error

            raise user_error(exc) from None  # unexpected: logged with its traceback
        return combine(prompt, caption, self.prompt_mode())

    def run_region(self, tab: Any, mask_mode: Any, prompt: str, *values: Any) -> Any:
        """The new prompt from a caption of the masked area; a warning for a tab without a mask."""
        try:
            image, mask = pick_region(tab, values, self.canvases)
            crop = crop_region(image, mask, self.region_options(), invert=_index(mask_mode) == 1)
        except EmptyMaskError:
            return refuse(NO_MASK)
        except CaptionerError as exc:
            return refuse(str(exc))
        log.info("Captioners: captioning the masked area, %s", crop.box)
        return self._into_prompt(prompt, crop.image)


def _settings_region() -> RegionOptions:
    from modules import shared

    from captioners.webui.settings import read_region

    return read_region(shared.opts)


NO_IMAGE = "No image in the open img2img tab. (For a folder, use the Captioners tab → Batch.)"
NO_MASK = "Nothing is masked in the open tab: paint over the area to caption first."
NOT_INPAINT = "The masked-area caption works in the Inpaint, Inpaint sketch and Inpaint upload tabs; use 💬 here."


def refuse(message: str) -> Any:
    """One console line and a warning in the page, the prompt left as it is. Raising gr.Error would
    also tell the page, but gradio 3 and 4 print a 25-line traceback for every raised error."""
    log.warning("Captioners: %s", message.splitlines()[0])
    warn(message)
    return gr.update()
