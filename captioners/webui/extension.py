"""The extension's callbacks; ``scripts/captioners_webui.py`` registers them with the WebUI."""

from __future__ import annotations

import logging
from typing import Any

from captioners.errors import CaptionerError
from captioners.service import CaptionService
from captioners.webui import settings
from captioners.webui.host import WebUIHost
from captioners.webui.img2img import Img2ImgButton

log = logging.getLogger(__name__)

TAB_TITLE = "Captioners"
TAB_ID = "captioners"

# The registry: this process's Extension (the latest made, after a Reload UI). The extension's other
# WebUI scripts (the img2img prompt script, caption on save) use it, so they share its one loaded model.
_RUNNING: dict[str, "Extension"] = {}


class WebUITabHooks:
    """The WebUI's additions to the shared tab: send-to buttons through ``infotext_utils``."""

    def send_buttons(self, image: Any, caption: Any) -> None:
        import gradio as gr
        from modules import infotext_utils

        with gr.Row(elem_id="captioners_send_row"):
            buttons = infotext_utils.create_buttons(["txt2img", "img2img", "inpaint"])
        for tab, button in buttons.items():
            infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
                paste_button=button, tabname=tab, source_text_component=caption, source_image_component=image))


class Extension:
    def __init__(self) -> None:
        self.host = WebUIHost()
        self.service = CaptionService(self.host)
        self.img2img = Img2ImgButton(self.caption_one, self.prompt_mode)
        _RUNNING["extension"] = self

    @staticmethod
    def running() -> "Extension":
        """The Extension ``scripts/captioners_webui.py`` made; a new one should that script have
        failed to load (then the other scripts still work, with their own service)."""
        extension = _RUNNING.get("extension")
        return extension if extension is not None else Extension()

    # ---- callbacks --------------------------------------------------------------------------------
    def on_ui_settings(self) -> None:
        from modules import shared

        settings.register(shared, self.model_ids)

    def on_ui_tabs(self) -> list[tuple[Any, str, str]]:
        from captioners.ui import build_tab

        return [(build_tab(self.service, WebUITabHooks()), TAB_TITLE, TAB_ID)]

    def on_after_component(self, component: Any, **kwargs: Any) -> None:
        self.img2img.on_component(component, kwargs)

    def on_app_started(self, demo: Any, app: Any) -> None:
        from modules import shared

        from captioners import api

        cmd_opts = shared.cmd_opts
        if not (getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)):
            log.info("Captioners: API routes not added (start the WebUI with --api to get them).")
            return
        api.mount(app, self.service, getattr(cmd_opts, "api_auth", None))

    def on_script_unloaded(self) -> None:
        """Reload UI / shutdown: free the model this instance holds."""
        try:
            self.service.unload()
        except Exception:
            log.exception("Captioners: unloading on script unload failed")

    # ---- used by the img2img button ---------------------------------------------------------------
    def caption_one(self, image: Any) -> str:
        return self.service.caption([image])[1][0]

    def prompt_mode(self) -> str:
        from modules import shared

        mode = getattr(shared.opts, "captioners_prompt_mode", "replace")
        return mode if mode in settings.PROMPT_MODES else "replace"

    def model_ids(self) -> list[str]:
        try:
            return list(self.service.model_specs())
        except CaptionerError as exc:
            log.warning("Captioners: cannot list models: %s", exc)
            return [self.service.settings().model]
