"""modules/gradio_extensons.py: the WebUI patches gradio so every component creation calls the
before/after-component callbacks with the constructor's kwargs, and accepts ``tooltip=``."""

import gradio as gr

from modules import script_callbacks


def patch(monkeypatch):
    base = getattr(gr.components, "IOComponent", None) or gr.components.Component  # gradio 3 / 4+
    original = base.__init__

    def init(self, *args, **kwargs):
        self.webui_tooltip = kwargs.pop("tooltip", None)
        script_callbacks.before_component_callback(self, **kwargs)
        original(self, *args, **kwargs)
        script_callbacks.after_component_callback(self, **kwargs)

    monkeypatch.setattr(base, "__init__", init)
