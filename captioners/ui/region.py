"""The Caption tab's Region: caption only part of the image, given by a painted mask or a box.

The mask is painted on a copy of the uploaded image (a brush component, see ``compat.mask_editor``);
x, y, w, h fields give a box instead and work with every gradio version. The crop itself is
``captioners.regions.crop_region``, as for the img2img button and the API.
"""

from __future__ import annotations

from functools import partial
from string import Template
from typing import Any

import gradio as gr

from captioners.errors import CaptionerError
from captioners.regions import OUTSIDE_MODES, RegionError, RegionOptions, crop_region, editor_value, parse_box
from captioners.service import CaptionService
from captioners.ui.compat import GRADIO_MAJOR, mask_editor, mask_editor_image, show_progress

NO_REGION = ("Paint over the area to caption on the Region image, or give its box (x, y, w, h; w and h above 0).")
NO_IMAGE = "Upload an image first."

# Gradio 3's brush (gr.Image with tool="sketch") loses the image it was given while hidden: when the
# closed Region accordion opens, its canvases are sized afresh and come up blank (seen in reForge;
# its brush radius is compat.mask_editor_image's matter). When the accordion is clicked open on such
# an editor (its drawing canvas blank), the page clicks this hidden button, which gives the editor
# the image again, now visible.
REGION_ID = "captioners_region"
MASK_ID = f"{REGION_ID}_mask"  # RegionControls' brush (its prefix + "_mask")
REDRAW_ID = f"{REGION_ID}_redraw"
_REDRAW_ON_OPEN = Template("""() => {
  if (window.captioners_region_redraw_installed) return [];
  window.captioners_region_redraw_installed = true;
  const root = () => { const app = document.querySelector("gradio-app"); return (app && app.shadowRoot) || document; };
  const blank = (canvas) => {
    const context = canvas.getContext("2d", {willReadFrequently: true});
    const points = [[0.5, 0.5], [0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]];
    return points.every(([x, y]) => context.getImageData(Math.floor(canvas.width * x),
                                                         Math.floor(canvas.height * y), 1, 1).data[3] === 0);
  };
  document.addEventListener("click", (event) => {
    const path = event.composedPath ? event.composedPath() : [event.target];
    if (!path.some((el) => el.id === "$region") || path.some((el) => el.id === "$mask")) return;
    setTimeout(() => {
      const editor = root().querySelector("#$mask");
      const drawing = editor && editor.querySelector("canvas[key=drawing]");
      const shown = editor && editor.querySelector("img[src]");
      if (!drawing || !shown || drawing.offsetParent === null || !drawing.width || !blank(drawing)) return;
      const button = root().querySelector("#$redraw");
      if (button) button.click();
    }, 300);
  }, true);
  return [];
}""")
REDRAW_ON_OPEN = _REDRAW_ON_OPEN.substitute(region=REGION_ID, mask=MASK_ID, redraw=REDRAW_ID)


class RegionControls:
    """The brush, the box fields, the crop options and the button, inside the Region accordion."""

    redraw_script: str | None = None  # for the page's load event: see REDRAW_ON_OPEN

    def __init__(self, prefix: str, defaults: RegionOptions):
        self.editor = mask_editor("Region: paint over the area to caption (a copy of the image above)",
                                  f"{prefix}_mask")
        with gr.Row():
            self.x = gr.Number(value=0, precision=0, label="Box x", elem_id=f"{prefix}_x")
            self.y = gr.Number(value=0, precision=0, label="Box y", elem_id=f"{prefix}_y")
            self.w = gr.Number(value=0, precision=0, label="Box width (0: use the mask)", elem_id=f"{prefix}_w")
            self.h = gr.Number(value=0, precision=0, label="Box height", elem_id=f"{prefix}_h")
        with gr.Row():
            outside, margin = region_values(defaults)
            self.outside = gr.Radio(list(OUTSIDE_MODES), value=outside, label="Outside the region",
                                    elem_id=f"{prefix}_outside")
            self.margin = gr.Slider(0, 100, value=margin, step=1,
                                    label="Margin around the region (% of its size)", elem_id=f"{prefix}_margin")
        self.button = gr.Button("Caption region", variant="primary", elem_id=f"{prefix}_button")

    @property
    def components(self) -> list[Any]:
        return [self.editor, self.x, self.y, self.w, self.h, self.outside, self.margin]


def region_values(defaults: RegionOptions) -> tuple[str, int]:
    """The (outside mode, margin in %) controls' values for the region Settings."""
    return defaults.outside, round(defaults.margin * 100)


def region_defaults(defaults: RegionOptions) -> list[Any]:
    """Updates of the outside mode and margin controls to the region Settings, on page load and after a
    Settings change: the WebUI builds the tab once, so the values it was built with went stale."""
    return [gr.update(value=value) for value in region_values(defaults)]


def region_of(image: Any, editor: Any, x: Any, y: Any, w: Any, h: Any) -> tuple[Any, Any]:
    """(image, mask or box) to crop: a painted mask first (on the brush's own image), else the box
    on the uploaded image. A RegionError when neither is given."""
    painted_on, mask = editor_value(editor)
    if mask is not None and mask.any():
        source = painted_on if painted_on is not None else image
        if source is None:
            raise RegionError(NO_IMAGE)
        return source, mask
    source = image if image is not None else painted_on
    if source is None:
        raise RegionError(NO_IMAGE)
    if not (w and h):
        raise RegionError(NO_REGION)
    return source, parse_box([_whole(x), _whole(y), _whole(w), _whole(h)])


def _whole(value: Any) -> Any:
    """A number field's value as a whole number (gradio gives floats, or None when cleared)."""
    if value is None:
        return 0
    return int(value) if isinstance(value, float) and value.is_integer() else value


def caption_region(service: CaptionService, image: Any, editor: Any, x: Any, y: Any, w: Any, h: Any,
                   outside: str, margin: float, model_label: str | None, *fields: Any) -> tuple[Any, str, str]:
    """Caption region button: (caption, status line, judgement table), as the Caption button."""
    from captioners.ui.tab import caption_image

    try:
        source, region = region_of(image, editor, x, y, w, h)
        defaults = service.settings().region
        options = RegionOptions(outside=outside or defaults.outside, margin=float(margin or 0) / 100,
                                min_margin=defaults.min_margin, min_size=defaults.min_size)
        crop = crop_region(source, region, options)
    except CaptionerError as exc:
        return gr.update(), f"Error: {exc}", ""
    text, status, table = caption_image(service, crop.image, model_label, *fields)
    if not status.startswith("Error"):
        status = f"{status} · region {crop.box}"
    return text, status, table


def region_section(service: CaptionService, image: Any, dropdown: Any, fields: list[Any], outputs: list[Any]
                   ) -> RegionControls:
    """The Region accordion; ``fields``: the judging then decoding controls (as for caption_image).
    Returns its controls: the tab's follow-the-Settings handler updates the outside mode and margin."""
    with gr.Accordion("Region: caption part of the image", open=False, elem_id=REGION_ID):
        region = RegionControls(REGION_ID, service.settings().region)
    # The brush paints on a copy of the uploaded image.
    image.change(mask_editor_image, inputs=[image], outputs=[region.editor], **show_progress(False))
    if GRADIO_MAJOR < 4:
        redraw = gr.Button("Redraw the Region image", visible=False, elem_id=REDRAW_ID)
        # The same value again changes nothing in the page: clear the editor first, then copy.
        redraw.click(lambda: None, outputs=[region.editor], **show_progress(False)).then(
            mask_editor_image, inputs=[image], outputs=[region.editor], **show_progress(False))
        region.redraw_script = REDRAW_ON_OPEN
    region.button.click(partial(caption_region, service), inputs=[image, *region.components, dropdown, *fields],
                        outputs=outputs)
    return region
