"""The "Captioners" section of the WebUI's Settings, and reading it back as service Settings.

Every option names its section and, where the default is not a str/int/bool, its component:
the WebUI's settings page refuses floats and lists without one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from captioners.paths import DEFAULT_MODEL
from captioners.options import DecodingOptions
from captioners.regions import OUTSIDE_MODES, RegionOptions
from captioners.service import AFTER_USE, MAX_IMAGE_MPIXELS, MAX_REQUEST_MPIXELS, Settings

SECTION = ("captioners", "Captioners")
CATEGORY = "postprocessing"  # the Settings page groups sections by category
PROMPT_MODES = ("replace", "append", "prepend")
SAVE_EXISTING = ("skip", "overwrite")  # caption on save, a caption file already there
STRATEGY_DEFAULT = "model default"
DECIMAL = {"precision": 2, "step": 0.01, "minimum": 0.01}  # gr.Number's default step 1 refuses 0.5 in the page
# A dropdown's hint goes into its own ``info``, never ``.info()``: the settings page puts an ``.info()``
# hint after the component's <label> text, and gradio 4 (Forge) renders a dropdown without a <label>,
# so Forge's page dropped the hint (its ui_settings_hints.js skips what it cannot place).
DEVICE_HINT = "auto: the WebUI's interrogate device (follows --use-cpu; Forge Neo: its one device, --cpu)"


def device_choices() -> list[str]:
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def options(shared: Any, model_ids: Callable[[], list[str]]) -> dict[str, Any]:
    """key -> OptionInfo, built with the host's ``shared.OptionInfo``."""
    info = shared.OptionInfo
    radio, slider = gr.Radio, gr.Slider
    return {
        "captioners_model": info(
            DEFAULT_MODEL, "Model for the img2img caption button, caption on save and the API", gr.Dropdown,
            lambda: {"choices": model_ids()}, refresh=model_ids),
        "captioners_device": info(
            "auto", "Device", gr.Dropdown,
            lambda: {"choices": device_choices(), "info": DEVICE_HINT}),
        "captioners_dtype": info(
            "auto", "Precision", radio, {"choices": ["auto", "fp16", "bf16", "fp32"]},
        ).info("auto: fp16 on a GPU unless --no-half, fp32 on the CPU"),
        "captioners_after_use": info(
            "offload", "After captioning", radio, {"choices": list(AFTER_USE)},
        ).info("keep the model where it is; offload it to CPU RAM (frees VRAM, reloads fast); or unload it"),
        "captioners_unload_after_batch": info(
            True, "Unload the model after a Batch run",
        ).info("a dataset job is usually followed by training, which needs the VRAM and RAM back"),
        "captioners_idle_unload_minutes": info(
            0, "Unload a kept or offloaded model after this many minutes unused (0: never)", gr.Number,
            {"precision": 0, "minimum": 0},
        ),
        "captioners_free_sd_vram": info(
            True, "Free the SD model's VRAM before captioning on a GPU",
        ).info("moves the SD model to CPU RAM while captioning; it comes back for the next generation"),
        "captioners_prompt_mode": info(
            "replace", "img2img caption button writes the caption", radio, {"choices": list(PROMPT_MODES)},
        ).info("replace the prompt, append to it, or prepend to it"),
        "captioners_models_dir": info(
            "", "Models folder",
        ).info("empty: the Captioners folder in the WebUI's models folder"),  # no <...>: info is HTML
        "captioners_strategy": info(
            STRATEGY_DEFAULT, "Default decoding strategy", radio,
            {"choices": [STRATEGY_DEFAULT, "greedy", "beam", "sample"]}),
        "captioners_num_beams": info(0, "Default beams (0: the model's)", slider,
                                     {"minimum": 0, "maximum": 16, "step": 1}),
        "captioners_max_new_tokens": info(0, "Default max new tokens (0: the model's)", slider,
                                          {"minimum": 0, "maximum": 200, "step": 1}),
        "captioners_temperature": info(0.0, "Default temperature (0: the model's)", slider,
                                       {"minimum": 0.0, "maximum": 2.0, "step": 0.05}),
        "captioners_top_p": info(0.0, "Default top-p (0: the model's)", slider,
                                 {"minimum": 0.0, "maximum": 1.0, "step": 0.01}),
        "captioners_seed": info(-1, "Default seed for sampling (-1: none)", gr.Number, {"precision": 0}),
        "captioners_score_clip": info(
            "ViT-L-14:openai", "CLIP that scores captions of models without their own CLIP (FuseCap)",
        ).info("ARCH:WEIGHTS as open_clip names them; CLIP-prefix and SBG score with their own CLIP"),
        "captioners_max_image_mpixels": info(
            MAX_IMAGE_MPIXELS, "API: largest image, in million pixels", gr.Number, DECIMAL,
        ).info("bigger images are refused (HTTP 413) before they are decoded"),
        "captioners_max_request_mpixels": info(
            MAX_REQUEST_MPIXELS, "API: all images of one request together, in million pixels", gr.Number, DECIMAL),
        # Caption on save (captioners/webui/on_save.py): for people who generate synthetic datasets.
        "captioners_save_captions": info(
            False, "Caption on save: write a caption file beside every image the WebUI saves",
        ).info("the image's name with .txt, captioned with the model above; grids and intermediate images "
               "(before highres fix, masks, init images) are left out"),
        "captioners_save_captions_prompt": info(
            False, "Caption on save: start the caption file with the image's prompt",
        ).info("prompt, then the caption"),
        "captioners_save_captions_existing": info(
            "skip", "Caption on save: when the caption file exists", radio, {"choices": list(SAVE_EXISTING)},
        ).info("skip keeps it (the WebUI's own text file of generation parameters has that name too); "
               "overwrite keeps a .bak copy of it first"),
    }


def register(shared: Any, model_ids: Callable[[], list[str]]) -> None:
    for key, option in {**options(shared, model_ids), **region_options(shared)}.items():
        option.section = SECTION
        if hasattr(option, "category_id"):  # A1111 >= 1.7, Forge, reForge group sections by category
            option.category_id = CATEGORY
        shared.opts.add_option(key, option)


def read(opts: Any, models_path: str) -> Settings:
    """The current Settings values (read at every use: changes apply without a restart)."""
    def number(key: str, cast: type, default: Any) -> Any:
        value = getattr(opts, key, default)
        try:
            return cast(value)
        except (TypeError, ValueError):
            return default

    def positive(key: str, default: float) -> float:
        value = number(key, float, default)
        return value if value > 0 else default

    strategy = getattr(opts, "captioners_strategy", STRATEGY_DEFAULT)
    decoding = DecodingOptions(
        strategy=None if strategy in (None, "", STRATEGY_DEFAULT) else strategy,
        num_beams=number("captioners_num_beams", int, 0) or None,
        max_new_tokens=number("captioners_max_new_tokens", int, 0) or None,
        temperature=number("captioners_temperature", float, 0.0) or None,
        top_p=number("captioners_top_p", float, 0.0) or None,
        seed=_seed(number("captioners_seed", int, -1)),
    )
    folder = getattr(opts, "captioners_models_dir", "") or os.path.join(models_path, "Captioners")
    after_use = getattr(opts, "captioners_after_use", "offload")
    idle_minutes = max(number("captioners_idle_unload_minutes", float, 0.0), 0.0)
    return Settings(
        models_dir=Path(folder).expanduser(),
        model=getattr(opts, "captioners_model", DEFAULT_MODEL) or DEFAULT_MODEL,
        device=getattr(opts, "captioners_device", "auto") or "auto",
        dtype=getattr(opts, "captioners_dtype", "auto") or "auto",
        after_use=after_use if after_use in AFTER_USE else "offload",
        after_batch="unload" if getattr(opts, "captioners_unload_after_batch", True) else None,
        idle_unload_s=idle_minutes * 60,
        decoding=decoding,
        max_image_mpixels=positive("captioners_max_image_mpixels", MAX_IMAGE_MPIXELS),
        max_request_mpixels=positive("captioners_max_request_mpixels", MAX_REQUEST_MPIXELS),
        score_clip=(getattr(opts, "captioners_score_clip", "") or "").strip() or None,
        region=read_region(opts),
    )


def _seed(value: int) -> int | None:
    return value if value >= 0 else None


# ---- captioning a masked area (the img2img region button, the tab's Region, the API's mask/box) ----
def region_options(shared: Any) -> dict[str, Any]:
    """The crop around a masked area: what happens outside the mask, and the margin around it."""
    info = shared.OptionInfo
    return {
        "captioners_region_outside": info(
            "keep", "Masked-area captions: outside the mask", gr.Radio, {"choices": list(OUTSIDE_MODES)},
        ).info("keep the surroundings, grey them out or blur them: grey and blur keep the caption on the masked area"),
        "captioners_region_margin": info(
            10, "Masked-area captions: margin around the mask, in % of its size", gr.Slider,
            {"minimum": 0, "maximum": 100, "step": 1},
        ).info(f"at least {RegionOptions.min_margin} px; small areas grow to {RegionOptions.min_size} px"),
    }


def read_region(opts: Any) -> RegionOptions:
    """The region Settings; a value the page could not have saved falls back to the default."""
    outside = getattr(opts, "captioners_region_outside", "keep")
    try:
        margin = min(max(float(getattr(opts, "captioners_region_margin", 10)), 0.0), 100.0) / 100
    except (TypeError, ValueError):
        margin = RegionOptions.margin
    return RegionOptions(outside=outside if outside in OUTSIDE_MODES else "keep", margin=margin)
