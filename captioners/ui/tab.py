"""The "Captioners" tab: Caption (one image), Batch (a folder) and Models.

The same builder serves the WebUI tab and the standalone app; what only the WebUI has (send-to
buttons) comes in through :class:`TabHooks`. Handlers are plain functions of the service so tests
can call them without a browser.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Iterator

import gradio as gr

from captioners.errors import CaptionerError
from captioners.service import CaptionService
from captioners.ui import render
from captioners.ui.batch_tab import batch_section
from captioners.ui.compat import blocks_kwargs, image_sources, js, show_progress
from captioners.ui.controls import DecodingControls, JudgingControls, choices_from, chosen_models, decoding_mapping, \
    judging_mapping, model_dropdown, model_row, refresh_models, user_error
from captioners.ui.local_paths import local_paths_section
from captioners.ui.region import RegionControls, region_defaults, region_section

log = logging.getLogger(__name__)

JUDGING_FIELDS = JudgingControls.FIELDS  # before the decoding controls in caption_image's inputs
FOLLOW_SETTINGS_ID = "captioners_follow_settings"


class TabHooks:
    """Host-specific additions to the tab; the standalone app uses these defaults."""

    def send_buttons(self, image: Any, caption: Any) -> None:
        """Add "Send to txt2img / img2img / inpaint" buttons (the WebUI only)."""


# ---- handlers (plain functions: the tests call them directly) -------------------------------------
def caption_image(service: CaptionService, image: Any, model_label: str | None, *fields: Any
                  ) -> tuple[Any, str, str]:
    """Caption button: (caption, status line, judgement table). A user error goes to the status line,
    and the caption being edited stays as it is. ``fields``: the judging controls, then the decoding ones."""
    if image is None:
        return gr.update(), "Upload an image first.", ""
    started = time.perf_counter()
    judging, decoding = fields[:JUDGING_FIELDS], fields[JUDGING_FIELDS:]
    try:
        models, results = service.judge([image], chosen_models(model_label, judging), decoding_mapping(*decoding),
                                        judging_mapping(*judging))
    except CaptionerError as exc:
        return gr.update(), f"Error: {exc}", ""
    except BaseException as exc:
        raise user_error(exc) from None
    result = results[0]
    score = f" · CLIPScore {result.score:.3f}" if result.score is not None else ""
    flags = f" · flagged: {', '.join(result.flag_codes)}" if result.flag_codes else ""
    text = "\n".join(result.captions) if len(result.captions) > 1 else result.caption
    return (text, f"{','.join(models)} · {time.perf_counter() - started:.2f} s{score}{flags}",
            render.judged_table(result))


def download_model(service: CaptionService, model_label: str | None) -> Iterator[str]:
    """Download button: a growing log, one line per file."""
    lines: list[str] = []
    try:
        for line in service.download(render.model_id(model_label)):
            lines.append(line)
            yield "\n".join(lines)
        lines.append("All files present.")
    except BaseException as exc:
        if not isinstance(exc, CaptionerError):
            log.exception("Captioners: download failed")
        lines.append(f"Failed: {exc}")
    yield "\n".join(lines)


def unload_model(service: CaptionService) -> str:
    try:
        unloaded = service.unload()
    except BaseException as exc:
        raise user_error(exc) from None
    return f"Unloaded {unloaded}." if unloaded else "No model was loaded."


def refresh_all(service: CaptionService, current: str | None, *others: str | None) -> list[Any]:
    """The Models section's dropdown and table, and the other sections' dropdowns."""
    update, table = refresh_models(service, current, prefer_ready=False)
    return [update, table, *(refresh_models(service, other)[0] for other in others)]


def follow_settings(service: CaptionService) -> list[Any]:
    """Page load, and a change of Settings > Captioners > Model or the region settings: (Models dropdown,
    models table, Caption dropdown, Batch dropdown, Region outside mode, Region margin) as the Settings and
    the files are now. The Caption and Batch dropdowns show the Settings' model or a ready one (see
    choices_from), the Models section the Settings' model itself. The WebUI builds the tab once, at
    start-up: without this they kept that moment's model and region defaults until a restart."""
    try:
        rows = service.model_rows()
        settings = service.settings()
    except BaseException as exc:
        raise user_error(exc) from None
    labels, shown = choices_from(rows, settings.model)
    _, configured = choices_from(rows, settings.model, prefer_ready=False)
    table = render.models_table(rows, str(settings.models_dir))
    return [gr.update(choices=labels, value=configured), table, gr.update(choices=labels, value=shown),
            gr.update(choices=labels, value=shown), *region_defaults(settings.region)]


# ---- layout ---------------------------------------------------------------------------------------
def build_tab(service: CaptionService, hooks: TabHooks | None = None, title: str | None = None,
              css: str | None = None) -> gr.Blocks:
    """The tab's Blocks; the WebUI renders it as a tab, the standalone app launches it (with a page
    title and the extension's CSS, which the WebUI loads from style.css by itself)."""
    hooks = hooks or TabHooks()
    rows, settings_model = service.model_rows(), service.settings().model
    labels, default = choices_from(rows, settings_model)
    with gr.Blocks(analytics_enabled=False, **blocks_kwargs(title, css)) as tab:
        with gr.Tabs(elem_id="captioners_tabs"):
            with gr.Tab("Caption", elem_id="captioners_tab_caption"):
                caption_dropdown, region = _caption_section(service, hooks, labels, default)
            with gr.Tab("Batch", elem_id="captioners_tab_batch"):
                batch_dropdown = batch_section(service, labels, default, model_row)
            with gr.Tab("Models", elem_id="captioners_tab_models"):
                configured = choices_from(rows, settings_model, prefer_ready=False)[1]
                models_dropdown, table = _models_section(service, rows, labels, configured,
                                                         [caption_dropdown, batch_dropdown])
        # Clicked by javascript/captioners.js when the WebUI's Settings change the model or the region.
        follow = gr.Button("Follow Settings", visible=False, elem_id=FOLLOW_SETTINGS_ID)
        follow_args = dict(fn=partial(follow_settings, service),
                           outputs=[models_dropdown, table, caption_dropdown, batch_dropdown, region.outside,
                                    region.margin], **show_progress(False))
        follow.click(**follow_args)
        tab.load(**follow_args)
        if region.redraw_script:
            tab.load(None, **js(region.redraw_script))
    return tab


def _caption_section(service: CaptionService, hooks: TabHooks, labels: list[str], default: str | None
                     ) -> tuple[Any, RegionControls]:
    """The Caption tab; returns (model dropdown, Region controls): both follow the Settings."""
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(type="pil", label="Image", elem_id="captioners_image", **image_sources("upload"))
            dropdown = model_row(service, labels, default, "captioners_model")
            with gr.Accordion("Decoding options", open=False, elem_id="captioners_decoding"):
                decoding = DecodingControls("captioners")
            with gr.Accordion("Scores and quality gates", open=False, elem_id="captioners_judging"):
                judging = JudgingControls("captioners")
            button = gr.Button("Caption", variant="primary", elem_id="captioners_caption_button")
        with gr.Column():
            caption = gr.Textbox(label="Caption (editable)", lines=4, interactive=True, elem_id="captioners_caption")
            status = gr.Textbox(label="Status", interactive=False, elem_id="captioners_status")
            judged = gr.HTML(elem_id="captioners_judged")
            hooks.send_buttons(image, caption)
    fields = [*judging.components, *decoding.components]
    button.click(partial(caption_image, service), inputs=[image, dropdown, *fields], outputs=[caption, status, judged])
    region = region_section(service, image, dropdown, fields, [caption, status, judged])
    return dropdown, region


def _models_section(service: CaptionService, rows: list[Any], labels: list[str], default: str | None,
                    others: list[Any]) -> tuple[Any, Any]:
    """The models table, the section's dropdown and its buttons; returns (dropdown, table)."""
    table = gr.HTML(render.models_table(rows, str(service.settings().models_dir)), elem_id="captioners_models_table")
    with gr.Row():
        dropdown = model_dropdown(labels, default, "captioners_models_model")
        refresh = gr.Button("🔄 Refresh", elem_id="captioners_models_refresh")
        download = gr.Button("Download missing files", elem_id="captioners_download")
        unload = gr.Button("Unload model", elem_id="captioners_unload")
    log_box = gr.Textbox(label="Log", lines=3, interactive=False, elem_id="captioners_models_log")
    local_paths_section(service, dropdown, log_box)

    refresh_args = dict(fn=partial(refresh_all, service), inputs=[dropdown, *others], outputs=[dropdown, table, *others])
    refresh.click(**refresh_args, **show_progress(False))
    download.click(partial(download_model, service), inputs=[dropdown], outputs=[log_box]).then(**refresh_args)
    unload.click(partial(unload_model, service), outputs=[log_box]).then(**refresh_args)
    return dropdown, table
