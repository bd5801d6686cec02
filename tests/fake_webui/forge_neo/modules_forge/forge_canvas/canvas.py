"""modules_forge/forge_canvas/canvas.py (Forge Neo): Forge's canvas with Neo's extra brush settings.

As in Forge, the image lives in hidden Textboxes (base64 PNG) with classes
logical_image_foreground / logical_image_background, created right after the ``gr.HTML`` that
carries the elem_id; Neo's preprocess also reads an uploaded ``forge-canvas://<id>`` reference.
"""

import base64
import uuid
from io import BytesIO

import gradio as gr
from PIL import Image

PNG_PREFIX = "data:image/png;base64,"


class LogicalImage(gr.Textbox):
    def __init__(self, *args, numpy=True, **kwargs):
        self.numpy = numpy
        super().__init__(*args, **kwargs)

    def preprocess(self, payload):
        if not isinstance(payload, str) or not payload.startswith(PNG_PREFIX):
            return None  # also a forge-canvas:// reference: no upload store here
        data = base64.b64decode(payload.removeprefix(PNG_PREFIX))
        return Image.open(BytesIO(data)).convert("RGBA")

    def get_block_name(self):
        return "textbox"


class ForgeCanvas:
    def __init__(self, no_upload=False, no_scribbles=False, contrast_scribbles=False, height=512,
                 scribble_color="#000000", scribble_color_fixed=False, scribble_width=4,
                 scribble_width_fixed=False, scribble_alpha=100, scribble_alpha_fixed=False, scribble_softness=0,
                 scribble_softness_fixed=False, visible=True, numpy=False, initial_image=None, elem_id=None,
                 elem_classes=None):
        self.uuid = "uuid_" + uuid.uuid4().hex
        self.block = gr.HTML("<div class='forge-canvas'></div>", visible=visible, elem_id=elem_id,
                             elem_classes=elem_classes)
        self.foreground = LogicalImage(visible=False, label="foreground", numpy=numpy, elem_id=self.uuid,
                                       elem_classes=["logical_image_foreground"])
        self.background = LogicalImage(visible=False, label="background", numpy=numpy, elem_id=self.uuid,
                                       elem_classes=["logical_image_background"])
