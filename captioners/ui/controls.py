"""Controls shared by the tab's sections: model dropdowns, decoding options, error messages."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from captioners.errors import CaptionerError
from captioners.service import CaptionService
from captioners.ui import render
from captioners.ui.compat import error, show_progress

log = logging.getLogger(__name__)

DEFAULT = "model default"


def user_error(exc: BaseException) -> Exception:
    """A message for the page; unexpected errors are logged with their traceback."""
    if isinstance(exc, CaptionerError):
        return error(str(exc))
    log.exception("Captioners: unexpected error")
    return error(f"{type(exc).__name__}: {exc} (details in the console)")


# ---- model dropdowns -------------------------------------------------------------------------------
def model_choices(service: CaptionService, prefer_ready: bool = True) -> tuple[list[str], str | None]:
    """Dropdown entries for every available model, and the entry to show (see :func:`choices_from`)."""
    return choices_from(service.model_rows(), service.settings().model, prefer_ready)


def choices_from(rows: list[Any], settings_model: str, prefer_ready: bool = True) -> tuple[list[str], str | None]:
    """Dropdown entries for ``rows``, and the entry to show: the Settings' model, unless ``prefer_ready``
    and its files are missing while another model has all of its own (a fresh install then opens on a
    model that runs, not on one that fails)."""
    labels = [render.model_label(row) for row in rows]
    chosen = next((row for row in rows if row.id == settings_model), None)
    if prefer_ready and (chosen is None or not chosen.ready):
        chosen = next((row for row in rows if row.ready), chosen)
    if chosen is None:
        return labels, labels[0] if labels else None
    return labels, render.model_label(chosen)


def refresh_models(service: CaptionService, current: str | None = None, prefer_ready: bool = True
                   ) -> tuple[Any, str]:
    """New dropdown choices (keeping the current model when it still exists, else the one
    :func:`choices_from` picks) and the models table."""
    try:
        rows = service.model_rows()
        labels, default = choices_from(rows, service.settings().model, prefer_ready)
    except BaseException as exc:
        raise user_error(exc) from None
    by_id = {render.model_id(label): label for label in labels}
    value = by_id.get(render.model_id(current), default)
    table = render.models_table(rows, str(service.settings().models_dir))
    return gr.update(choices=labels, value=value), table


def model_dropdown(labels: list[str], default: str | None, elem_id: str) -> gr.Dropdown:
    dropdown = gr.Dropdown(labels, value=default, label="Model", elem_id=elem_id)
    # The default comes from Settings: keep the WebUI from freezing it in ui-config.json.
    dropdown.do_not_save_to_config = True
    return dropdown


def model_row(service: CaptionService, labels: list[str], default: str | None, elem_id: str) -> gr.Dropdown:
    """A model dropdown with a refresh button beside it."""
    with gr.Row():
        dropdown = model_dropdown(labels, default, elem_id)
        refresh = gr.Button("🔄", elem_id=f"{elem_id}_refresh", elem_classes=["captioners-tool"])
    refresh.click(lambda current: refresh_models(service, current)[0], inputs=[dropdown], outputs=[dropdown],
                  **show_progress(False))
    return dropdown


# ---- decoding options ------------------------------------------------------------------------------
class DecodingControls:
    """A control per DecodingOptions field. Unset values (0, -1, "model default") fall back to the
    defaults in Settings (in the WebUI), then to the model's own."""

    def __init__(self, prefix: str):
        with gr.Row():
            self.strategy = gr.Radio([DEFAULT, "greedy", "beam", "sample"], value=DEFAULT, label="Strategy",
                                     elem_id=f"{prefix}_strategy")
            self.seed = gr.Number(value=-1, precision=0, label="Seed (-1: none)", elem_id=f"{prefix}_seed")
        with gr.Row():
            self.num_beams = gr.Slider(0, 16, value=0, step=1, label="Beams (0: default)")
            self.max_new_tokens = gr.Slider(0, 200, value=0, step=1, label="Max new tokens (0: default)")
            self.min_new_tokens = gr.Slider(0, 100, value=0, step=1, label="Min new tokens (0: default)")
        with gr.Row():  # two per row: gradio 3/4 give a slider's number box a fixed width
            self.temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: default)")
            self.top_p = gr.Slider(0, 1, value=0, step=0.01, label="Top-p (0: default)")
        with gr.Row():
            self.top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0: default)")
            self.repetition_penalty = gr.Slider(0, 2, value=0, step=0.05, label="Repetition penalty (0: default)")
        with gr.Row():
            self.num_candidates = gr.Slider(0, 32, value=0, step=1,
                                            label="Candidates per image, for re-ranking models (0: default)")
            self.prompt = gr.Textbox(label="Prompt the caption continues, for prompted models (empty: default)")
            self.keep_prompt = gr.Radio([DEFAULT, "keep", "drop"], value=DEFAULT, label="Prompt in the caption")
            self.raw = gr.Checkbox(value=False, label="Raw caption (skip the model's clean-up)")
        with gr.Row():
            self.captions_per_image = gr.Slider(0, 10, value=0, step=1, label="Captions per image (0: one)",
                                                elem_id=f"{prefix}_captions_per_image")
            self.candidates = gr.Radio([DEFAULT, "beam", "sample"], value=DEFAULT, label="Candidates made by",
                                       elem_id=f"{prefix}_candidates")
            self.select = gr.Radio(["model", "clip"], value="model", label="Rank candidates by (clip: best-of-N)",
                                   elem_id=f"{prefix}_select")
            self.guidance = gr.Slider(0, 5, value=0, step=0.1, label="Specificity guidance (CLIP-prefix; 0: none)",
                                      elem_id=f"{prefix}_guidance")

    @property
    def components(self) -> list[Any]:
        return [self.strategy, self.seed, self.num_beams, self.max_new_tokens, self.min_new_tokens, self.temperature,
                self.top_p, self.top_k, self.repetition_penalty, self.num_candidates, self.prompt, self.keep_prompt,
                self.raw, self.captions_per_image, self.candidates, self.select, self.guidance]


def decoding_mapping(strategy=None, seed=None, num_beams=None, max_new_tokens=None, min_new_tokens=None,
                     temperature=None, top_p=None, top_k=None, repetition_penalty=None, num_candidates=None,
                     prompt=None, keep_prompt=None, raw=None, captions_per_image=None, candidates=None, select=None,
                     guidance=None) -> dict[str, Any]:
    """The values of :class:`DecodingControls` as a DecodingOptions mapping, unset fields left out."""
    def positive_int(value):
        return int(value) if value and value > 0 else None

    def positive_float(value):
        return float(value) if value and value > 0 else None

    values = {
        "strategy": None if strategy in (None, DEFAULT) else strategy,
        "seed": int(seed) if seed is not None and seed >= 0 else None,
        "num_beams": positive_int(num_beams),
        "max_new_tokens": positive_int(max_new_tokens),
        "min_new_tokens": positive_int(min_new_tokens),
        "temperature": positive_float(temperature),
        "top_p": positive_float(top_p),
        "top_k": positive_int(top_k),
        "repetition_penalty": positive_float(repetition_penalty),
        "num_candidates": positive_int(num_candidates),
        "prompt": prompt or None,
        "keep_prompt": {"keep": True, "drop": False}.get(keep_prompt),
        "postprocess": False if raw else None,
        "captions_per_image": positive_int(captions_per_image),
        "candidates": None if candidates in (None, DEFAULT) else candidates,
        "select": "clip" if select == "clip" else None,
        "guidance": positive_float(guidance),
    }
    return {k: v for k, v in values.items() if v is not None}


# ---- judging ---------------------------------------------------------------------------------------
class JudgingControls:
    """CLIPScore and the quality gates (captioners.judging.options.JudgingOptions), and more models
    whose candidates are ranked with the chosen one's (best-of-N across models)."""

    FIELDS = 7  # len(components): handlers split their inputs with it

    def __init__(self, prefix: str, budget: bool = True):
        with gr.Row():
            self.score = gr.Checkbox(value=False, label="CLIPScore every caption", elem_id=f"{prefix}_score")
            self.score_clip = gr.Textbox(label="Scoring CLIP, ARCH[:WEIGHTS] (empty: the model's own, else "
                                               "ViT-L-14:openai)", elem_id=f"{prefix}_score_clip")
            self.on_flag = gr.Radio(["keep", "skip", "retry"], value="keep", label="Flagged captions",
                                    elem_id=f"{prefix}_on_flag")
        with gr.Row():
            self.max_tokens = gr.Slider(0, 300, value=75, step=1, label="CLIP token budget (0: no check)",
                                        elem_id=f"{prefix}_max_tokens", visible=budget)
            self.t5_max_tokens = gr.Slider(0, 1024, value=0, step=1, label="T5 token budget (Flux/SD3; 0: off)",
                                           elem_id=f"{prefix}_t5_max_tokens")
            self.trim = gr.Checkbox(value=False, label="Trim to the budget (at a sentence or comma)",
                                    elem_id=f"{prefix}_trim")
        self.extra_models = gr.Textbox(label="Also make candidates with these models (ids, comma-separated; "
                                             "with Rank by clip: best-of-N across models)",
                                       elem_id=f"{prefix}_extra_models")

    @property
    def components(self) -> list[Any]:
        return [self.score, self.score_clip, self.on_flag, self.max_tokens, self.t5_max_tokens, self.trim,
                self.extra_models]


def chosen_models(model_label: str | None, judging: Any) -> str | list[str] | None:
    """The dropdown's model, followed by the judging controls' extra model ids (when there are any)."""
    from captioners.ui import render

    model = render.model_id(model_label)
    extra = [part.strip() for part in str(judging[6] if len(judging) > 6 and judging[6] else "").split(",")
             if part.strip()]
    if not extra:
        return model
    first = model or None
    return [first, *extra] if first else extra


def judging_mapping(score=False, score_clip=None, on_flag="keep", max_tokens=75, t5_max_tokens=0,
                    trim=False, extra_models=None) -> dict[str, Any]:
    """The values of :class:`JudgingControls` as a JudgingOptions mapping (extra_models: see chosen_models)."""
    return {"score": bool(score), "score_clip": (score_clip or "").strip() or None, "on_flag": on_flag or "keep",
            "max_tokens": int(max_tokens or 0), "t5_max_tokens": int(t5_max_tokens or 0), "trim_to_budget": bool(trim)}
