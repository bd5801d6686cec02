"""Batch tab: caption a folder with live progress, Interrupt, previews, failures and the summary."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable, Iterator

import gradio as gr

from captioners.errors import CaptionerError
from captioners.service import BatchHandle, CaptionService
from captioners.ui import render
from captioners.ui.controls import DecodingControls, JudgingControls, chosen_models, decoding_mapping, judging_mapping

log = logging.getLogger(__name__)

POLICIES = ("skip", "overwrite", "append", "prepend")
POLL_S = 0.5  # how often the page refreshes a running batch's progress
NO_INPUTS = ("Nothing to caption: enter a folder (or an image, or a pattern such as /data/*.png) in "
             "\"Input folders or images\", one per line.")


def words(text: str | None) -> list[str]:
    """Comma- or line-separated words / tags from a textbox."""
    return [w.strip() for w in (text or "").replace("\n", ",").split(",") if w.strip()]


JUDGING_FIELDS = JudgingControls.FIELDS
SHAPING_FIELDS = 18  # job_mapping's named parameters, before the judging controls


def job_mapping(inputs: str, recursive: bool, output_dir: str, extension: str, existing: str, backup: bool,
                batch_size: float, dry_run: bool, prefix: str, suffix: str, trigger: str, trigger_mode: str,
                class_words: str, exclude: str, lowercase: bool, strip_period: bool, join: bool = False,
                report_html: str = "", *rest: Any) -> dict[str, Any]:
    """The tab's fields as a ``BatchJob.from_mapping`` mapping (unset text options left out); ``rest``:
    the judging controls' values, then the decoding ones."""
    judging, decoding = rest[:JUDGING_FIELDS], rest[JUDGING_FIELDS:]
    judged = judging_mapping(*judging) if judging else {}
    max_tokens = judged.pop("max_tokens", 75)
    shaping: dict[str, Any] = {"prefix": prefix or "", "suffix": suffix or "", "trigger": (trigger or "").strip(),
                               "trigger_mode": trigger_mode or "prepend", "class_words": words(class_words),
                               "exclude": words(exclude), "lowercase": bool(lowercase),
                               "strip_period": bool(strip_period), "max_tokens": max_tokens}
    return {
        "inputs": [line.strip() for line in (inputs or "").splitlines() if line.strip()],
        "recursive": bool(recursive),
        "output_dir": (output_dir or "").strip() or None,
        "extension": (extension or "").strip() or ".txt",
        "existing": existing or "skip",
        "backup": bool(backup),
        "batch_size": int(batch_size or 1),
        "dry_run": bool(dry_run),
        "shaping": shaping,
        "decoding": decoding_mapping(*decoding),
        "judging": judged,
        "join": bool(join),
        "report_html": (report_html or "").strip() or None,
    }


LATEST = ("image", "latest captions")


def batch_updates(handle: BatchHandle | None, model: str, message: str = "") -> tuple[str, str, str, str, str]:
    """(progress, latest captions / dry-run changes, failures, summary, report) for the page."""
    if handle is None:
        return render.error_html(message), "", "", "", ""
    if not handle.done.is_set():
        return (render.progress_line(handle.progress, model),
                render.pairs_table(handle.latest, LATEST, "No caption yet."), "", "", "")
    if handle.error is not None:
        return (render.progress_line(handle.progress, model, ended="failed"), "", "",
                render.error_html(str(handle.error)), "")
    summary = handle.summary
    if getattr(summary, "dry_run", False):
        changes = [(c.get("caption_file"), f"{c.get('action')}: {c.get('new')}") for c in summary.changes]
        written = render.pairs_table(changes, ("caption file", "would be"), "Nothing would change.")
    else:
        written = render.pairs_table(handle.latest, LATEST, "No caption written.")
    ended = "interrupted" if getattr(summary, "interrupted", False) else "finished"
    return (render.progress_line(handle.progress, model, ended=ended), written,
            render.pairs_table(getattr(summary, "failed", []), ("image", "reason"), "No failures."),
            render.summary_html(summary, model), render.dataset_html(summary))


def start_batch(service: CaptionService, model_label: str | None, *fields: Any) -> Iterator[tuple[Any, ...]]:
    """Run a batch in the background and stream its progress until it ends.

    Yields (progress, captions, failures, summary, report, notice); the notice line (where Interrupt
    answers) is cleared once at the start and otherwise left to the Interrupt button.
    """
    model = chosen_models(model_label, fields[SHAPING_FIELDS:SHAPING_FIELDS + JUDGING_FIELDS])
    try:
        job = job_mapping(*fields)
        if not job["inputs"]:  # the engine's own message names its command-line and API inputs
            raise CaptionerError(NO_INPUTS)
        handle = BatchHandle(service, job, model)
    except CaptionerError as exc:
        yield (*batch_updates(None, "", str(exc)), "")
        return
    notice: Any = ""
    shown = ",".join(model) if isinstance(model, list) else model or ""
    while not handle.done.wait(POLL_S):
        yield (*batch_updates(handle, shown), notice)
        notice = gr.update()
    yield (*batch_updates(handle, shown), notice)


def interrupt_batch(service: CaptionService) -> str:
    """Its own output line: it races the batch's last update, which must not be overwritten."""
    return ("<p>Interrupt requested: the batch stops after the current images.</p>" if service.interrupt()
            else "<p>No batch is running.</p>")


def batch_section(service: CaptionService, labels: list[str], default: str | None,
                  model_row: Callable[..., gr.Dropdown]) -> gr.Dropdown:
    with gr.Row(equal_height=False):
        with gr.Column():
            inputs = gr.Textbox(label="Input folders or images (one per line)", lines=2,
                                elem_id="captioners_batch_inputs")
            with gr.Row():
                recursive = gr.Checkbox(label="Include sub-folders", elem_id="captioners_batch_recursive")
                dry_run = gr.Checkbox(label="Dry run (write nothing, show what would change)",
                                      elem_id="captioners_batch_dry_run")
            output_dir = gr.Textbox(label="Output folder (empty: caption files beside the images)",
                                    elem_id="captioners_batch_output")
            with gr.Row():
                extension = gr.Textbox(".txt", label="Caption file extension", elem_id="captioners_batch_extension")
                existing = gr.Radio(list(POLICIES), value="skip", label="When a caption file exists",
                                    elem_id="captioners_batch_existing")
            backup = gr.Checkbox(value=True, label="Keep a .bak copy of caption files it changes",
                                 elem_id="captioners_batch_backup")
            with gr.Accordion("Text shaping", open=False, elem_id="captioners_batch_shaping"):
                with gr.Row():
                    trigger = gr.Textbox(label="Trigger word", elem_id="captioners_batch_trigger")
                    trigger_mode = gr.Radio(["prepend", "replace"], value="prepend", label="Trigger word",
                                            elem_id="captioners_batch_trigger_mode")
                    class_words = gr.Textbox(label="Class words it replaces (comma-separated)",
                                             elem_id="captioners_batch_class_words")
                with gr.Row():
                    prefix = gr.Textbox(label="Prefix (verbatim, include your own \", \")",
                                        elem_id="captioners_batch_prefix")
                    suffix = gr.Textbox(label="Suffix (verbatim)", elem_id="captioners_batch_suffix")
                    exclude = gr.Textbox(label="Remove words / tags (comma-separated)",
                                         elem_id="captioners_batch_exclude")
                with gr.Row():
                    lowercase = gr.Checkbox(label="Lowercase", elem_id="captioners_batch_lowercase")
                    strip_period = gr.Checkbox(label="Drop a trailing \" .\"", elem_id="captioners_batch_strip_period")
            batch_size = gr.Slider(1, 64, value=8, step=1, label="Batch size", elem_id="captioners_batch_size")
            dropdown = model_row(service, labels, default, "captioners_batch_model")
            with gr.Accordion("Decoding options", open=False, elem_id="captioners_batch_decoding"):
                decoding = DecodingControls("captioners_batch")
            with gr.Accordion("Scores, quality gates and report", open=False, elem_id="captioners_batch_judging"):
                judging = JudgingControls("captioners_batch")
                with gr.Row():
                    join = gr.Checkbox(label="Several captions: one line, joined by \", \" (default: one per line)",
                                       elem_id="captioners_batch_join")
                    report_html = gr.Textbox(label="Dataset report file (.html; empty: none)",
                                             elem_id="captioners_batch_report_html")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="captioners_batch_start")
                stop = gr.Button("Interrupt", variant="stop", elem_id="captioners_batch_interrupt")
        with gr.Column():
            progress = gr.HTML(elem_id="captioners_batch_progress")
            notice = gr.HTML(elem_id="captioners_batch_notice")
            summary = gr.HTML(elem_id="captioners_batch_summary")
            previews = gr.HTML(elem_id="captioners_batch_previews")
            failures = gr.HTML(elem_id="captioners_batch_failures")
            report = gr.HTML(elem_id="captioners_batch_report")
    fields = [inputs, recursive, output_dir, extension, existing, backup, batch_size, dry_run, prefix, suffix, trigger,
              trigger_mode, class_words, exclude, lowercase, strip_period, join, report_html, *judging.components,
              *decoding.components]
    start.click(partial(start_batch, service), inputs=[dropdown, *fields],
                outputs=[progress, previews, failures, summary, report, notice])
    # Not queued: it must get through while the batch's own event holds the queue.
    stop.click(partial(interrupt_batch, service), outputs=[notice], queue=False)
    return dropdown
