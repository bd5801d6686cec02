"""Options shared by the subcommands: models, decoding, judging, logging, and loading the --model(s)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from captioners.errors import CaptionerError
from captioners.paths import DEFAULT_MODEL

log = logging.getLogger("captioners")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", help="models folder (default: $CAPTIONERS_MODELS_DIR or the user cache)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Model choice and every preset field a user may override."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model id or checkpoint path (default {DEFAULT_MODEL}); several comma-separated ids "
                            "make candidates together (best-of-N across models with --select clip)")
    group.add_argument("--weights", help="use this local weights file (or folder) instead of the preset's")
    group.add_argument("--clip-arch", help="open_clip architecture name, e.g. ViT-L-14")
    group.add_argument("--clip-weights", help="open_clip pretrained tag (openai) or a local CLIP weights file")
    group.add_argument("--clip-config", help="open_clip model-config JSON for a custom CLIP architecture")
    group.add_argument("--tokenizer", help="GPT-2 tokenizer folder (vocab.json, merges.txt) or hub repo id")
    group.add_argument("--vocabulary", help="keyword vocabulary folder (SBG: all_labels + encyclopedia, .pkl or .json)")
    group.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                       help="L2-normalise the CLIP embedding (default: what the checkpoint was trained with)")
    group.add_argument("--postprocess", choices=("icg", "clipcap", "none"), help="caption clean-up style")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (unset options take the model's defaults)")
    group.add_argument("--strategy", choices=("greedy", "beam", "sample"),
                       help="greedy (argmax), beam search, or sampling")
    group.add_argument("--num-beams", type=int, metavar="N", help="beams of beam search (1-32)")
    group.add_argument("--max-new-tokens", type=int, metavar="N", help="longest caption, in tokens")
    group.add_argument("--min-new-tokens", type=int, metavar="N", help="shortest caption, in tokens (FuseCap)")
    group.add_argument("--temperature", type=float, help="sampling and beam temperature (above 0)")
    group.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this mass")
    group.add_argument("--top-k", type=int, metavar="K", help="sampling: keep the K most likely tokens")
    group.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeated tokens")
    group.add_argument("--seed", type=int, help="makes sampling reproducible (the same caption alone or in a batch)")
    group.add_argument("--num-candidates", type=int, metavar="N",
                       help="candidates made per image: SBG's sampled guesses before re-ranking; for "
                            "--captions-per-image and --select clip the pool they are chosen from (default 5)")
    group.add_argument("--captions-per-image", type=int, metavar="N",
                       help="keep the N best distinct captions per image (caption files: one per line)")
    group.add_argument("--candidates", choices=("beam", "sample"),
                       help="how several candidates are made: the best beams of one search, or seeded samples "
                            "(default: sample when --strategy sample, else beam)")
    group.add_argument("--select", choices=("model", "clip"),
                       help="rank candidates by the model's own order (default) or by CLIPScore (best-of-N)")
    group.add_argument("--guidance", type=float, metavar="G",
                       help="CLIP-prefix: specificity guidance, more image-specific captions (0 = none; try 1-3)")
    group.add_argument("--prompt", help="FuseCap: text the caption continues")
    group.add_argument("--keep-prompt", action=argparse.BooleanOptionalAction, default=None,
                       help="FuseCap: keep the prompt at the start of the caption (default: removed)")
    group.add_argument("--raw", dest="postprocess_captions", action="store_false", default=None,
                       help="skip the preset's caption clean-up")


MODEL_OVERRIDE_ARGS = ("weights", "clip_arch", "clip_weights", "clip_config", "tokenizer", "vocabulary", "normalize",
                       "postprocess")
DECODING_ARGS = ("strategy", "num_beams", "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k",
                 "repetition_penalty", "seed", "num_candidates", "prompt", "keep_prompt", "captions_per_image",
                 "candidates", "select", "guidance")


def add_judging_options(parser: argparse.ArgumentParser, budget: bool = True) -> None:
    """CLIPScore and the quality gates (the batch command has --max-tokens among its text options)."""
    group = parser.add_argument_group("judging (scores and quality gates)")
    group.add_argument("--score", action="store_true",
                       help="CLIPScore of every caption (2.5 * max(cos, 0)); the model's own CLIP when it has one")
    group.add_argument("--score-clip", metavar="ARCH[:WEIGHTS]",
                       help="CLIP that scores captions, e.g. ViT-L-14:openai (default: the model's own CLIP, "
                            "else ViT-L-14:openai, downloaded like model files)")
    if budget:
        group.add_argument("--max-tokens", type=int, default=75,
                           help="flag captions longer than this many CLIP tokens (0: no check; default 75)")
    group.add_argument("--t5-max-tokens", type=int, default=0, metavar="N",
                       help="also flag captions longer than N T5 tokens (Flux / SD3 trainers, e.g. 512; 0: off)")
    group.add_argument("--trim-to-budget", action="store_true",
                       help="cut captions over --max-tokens at the last sentence or comma boundary (never mid-word)")
    group.add_argument("--on-flag", choices=("keep", "skip", "retry"), default="keep",
                       help="flagged captions: keep them (default), skip the image (write nothing), or retry "
                            "with beam search and keep the better one")


def judging_options(args: argparse.Namespace):
    from captioners.judging.options import JudgingOptions

    return JudgingOptions(score=args.score, score_clip=args.score_clip, max_tokens=args.max_tokens,
                          t5_max_tokens=args.t5_max_tokens, trim_to_budget=args.trim_to_budget, on_flag=args.on_flag)


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in MODEL_OVERRIDE_ARGS if getattr(args, name, None) is not None}


def decoding_options(args: argparse.Namespace):
    from captioners.options import DecodingOptions

    values = {name: getattr(args, name) for name in DECODING_ARGS if getattr(args, name, None) is not None}
    if getattr(args, "postprocess_captions", None) is False:
        values["postprocess"] = False
    return DecodingOptions.from_mapping(values)


def model_ids(args: argparse.Namespace) -> list[str]:
    ids = [part.strip() for part in str(args.model).split(",") if part.strip()]
    if not ids:
        raise CaptionerError("--model is empty: give a model id (python -m captioners models lists them).")
    if len(ids) > 1 and model_overrides(args):
        raise CaptionerError(f"--{next(iter(model_overrides(args))).replace('_', '-')} applies to one model; "
                             "with several --model ids put such settings in presets.json.")
    return ids


def captioners_from_args(args: argparse.Namespace, judging: Any = None) -> list:
    """The --model captioner(s), not loaded. Every model's files, and those of the scoring CLIP the
    judging will need, are checked first (one error names all missing ones)."""
    from captioners.judging.judge import planned_scoring_clip
    from captioners.paths import resolve_models_dir
    from captioners.registry import create_captioner
    from captioners.weights import ensure_assets

    models_dir = resolve_models_dir(args.models_dir)
    captioners = [create_captioner(model, models_dir, model_overrides(args)) for model in model_ids(args)]
    assets = [a for c in captioners for a in type(c).assets(c.spec)]
    scoring = planned_scoring_clip([c.spec for c in captioners], decoding_options(args), judging) if judging else None
    if scoring is not None:
        from captioners.judging.scoring import scoring_assets

        assets += scoring_assets(scoring)
    if len(captioners) > 1 or scoring is not None:
        ensure_assets(assets, models_dir, model=", ".join(c.spec.id for c in captioners))
    return captioners


def load_captioners_from_args(args: argparse.Namespace, judging: Any = None) -> list:
    """The --model captioner(s), loaded on --device (files checked first, see captioners_from_args)."""
    return [captioner.load(args.device, args.dtype) for captioner in captioners_from_args(args, judging)]


def one_line(text: str) -> str:
    """Tabs and line breaks would break the path<TAB>caption format."""
    return " ".join(text.replace("\t", " ").splitlines())


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)
    if not debug:
        # transformers and huggingface_hub set their loggers' level when they are imported (later, on
        # first use), and hub also prints through a handler of its own: tell them through their variables.
        for variable in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
            os.environ.setdefault(variable, "error")
        for noisy in ("transformers", "huggingface_hub", "open_clip", "timm"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
