"""modules/ui_components.py: ToolButton (a small button with class "tool")."""

import gradio as gr


class ToolButton(gr.Button):
    def __init__(self, *args, **kwargs):
        # The WebUI's gradio patch takes tooltip= on every component (gradio 4 checks kwargs per class).
        self.webui_tooltip = kwargs.pop("tooltip", None)
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"
