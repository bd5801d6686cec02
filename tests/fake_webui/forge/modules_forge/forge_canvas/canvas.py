"""modules_forge/forge_canvas/canvas.py (Forge): an HTML canvas whose image lives in hidden
Textboxes (base64 PNG) with classes logical_image_foreground / logical_image_background."""

import base64
import uuid
from io import BytesIO

import gradio as gr
from PIL import Image


class LogicalImage(gr.Textbox):
    def __init__(self, *args, numpy=True, **kwargs):
        self.numpy = numpy
        super().__init__(*args, **kwargs)

    def preprocess(self, payload):
        if not isinstance(payload, str) or not payload.startswith("data:image/png;base64,"):
            return None
        data = base64.b64decode(payload.removeprefix("data:image/png;base64,"))
        return Image.open(BytesIO(data)).convert("RGBA")

    def get_block_name(self):
        return "textbox"


class ForgeCanvas:
    def __init__(self, no_upload=False, no_scribbles=False, contrast_scribbles=False, height=512,
                 scribble_color="#000000", numpy=False, initial_image=None, elem_id=None, elem_classes=None, **_):
        self.uuid = "uuid_" + uuid.uuid4().hex
        self.block = gr.HTML("<div class='forge-canvas'></div>", elem_id=elem_id, elem_classes=elem_classes)
        self.foreground = LogicalImage(visible=False, label="foreground", numpy=numpy, elem_id=self.uuid,
                                       elem_classes=["logical_image_foreground"])
        self.background = LogicalImage(visible=False, label="background", numpy=numpy, elem_id=self.uuid,
                                       elem_classes=["logical_image_background"])
