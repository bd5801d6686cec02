"""``python -m captioners caption``: print path<TAB>caption per image (nothing is written)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from captioners.cli.options import (add_common, add_decoding_options, add_judging_options, add_model_options,
                                    decoding_options, judging_options, load_captioners_from_args, one_line)
from captioners.display import display_path, json_bytes
from captioners.errors import CaptionerError


def cmd_caption(args: argparse.Namespace) -> int:
    from captioners.images import load_image
    from captioners.options import checked_number

    options = decoding_options(args)
    judging = judging_options(args)
    batch_size = checked_number("batch_size", args.batch_size)
    paths, failures = caption_inputs(args.inputs, args.recursive)
    for path, reason in failures:
        print(f"error: {display_path(path)}: {reason}", file=sys.stderr)
    if not paths:  # nothing to caption: say so before spending a model load on it
        hint = "" if args.recursive else " (sub-folders are searched only with -r/--recursive)"
        raise CaptionerError(f"No images to caption in {', '.join(map(display_path, args.inputs))}{hint}.")
    judge = make_judge(load_captioners_from_args(args, judging), options, judging)
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(load_image(path))
                chunk.append(path)
            except CaptionerError as exc:
                failures.append((path, str(exc)))
                print(f"error: {exc}", file=sys.stderr)
        if images:
            for path, result in zip(chunk, judge.judge_images(images)):
                print_judged(path, result, ",".join(judge.model_ids), args.jsonl)
    return 1 if failures else 0


def make_judge(captioners: list, options: Any, judging: Any):
    """The Judge of a caption run, with its token counters and scoring CLIP loaded."""
    from captioners.batch.shaping import clip_token_counter
    from captioners.judging.judge import Judge

    count_t5 = None
    if judging.t5_max_tokens:
        from captioners.judging.budgets import t5_token_counter

        count_t5 = t5_token_counter(captioners[0].models_dir)
    judge = Judge(captioners, options, judging, count_tokens=clip_token_counter() if judging.max_tokens else None,
                  count_t5_tokens=count_t5)
    return judge.load(captioners[0].device, captioners[0].dtype)


def print_judged(path: Path, result: Any, model: str, as_json: bool) -> None:
    """path<TAB>caption (a line per caption; <TAB>score with --score), and a "flagged:" line on stderr
    per quality gate a caption failed; or one JSON object per image."""
    if as_json:
        record = {"path": str(path), "caption": result.caption, "model": result.models[0] if result.models else model}
        if len(result.captions) > 1 or result.score is not None or result.flag_codes:
            record.update(result.to_dict())
            record["clip_score"] = result.score
        print(json_bytes(record).decode("utf-8"), flush=True)
    else:
        if not result.skipped:
            for caption, score in zip(result.captions, result.scores):
                tail = f"\t{score:.4f}" if score is not None else ""
                print(f"{display_path(path)}\t{one_line(caption)}{tail}", flush=True)
    for flag in (result.flags[0] if result.flags else []):
        action = " (skipped)" if result.skipped else " (retried)" if result.retried else ""
        print(f"flagged: {display_path(path)}: {flag.code}: {flag.message}{action}", file=sys.stderr)


def caption_inputs(inputs: Sequence[str], recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images to caption, and the named inputs that cannot be (missing, a folder... not an image),
    each checked from its header: no model is loaded for inputs that would all fail."""
    from captioners.images import check_image_file, iter_image_files

    paths, failures = [], []
    for path in iter_image_files(inputs, recursive=recursive):
        reason = check_image_file(path)
        if reason:
            failures.append((path, reason))
        else:
            paths.append(path)
    return paths, failures


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("caption", help="caption images and print path<TAB>caption",
                            description="Caption images and print path<TAB>caption per image (nothing is written).")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--recursive", "-r", action="store_true", help="look into sub-folders")
    parser.add_argument("--batch-size", type=int, default=8, help="images captioned together (default 8)")
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per image")
    add_model_options(parser)
    add_decoding_options(parser)
    add_judging_options(parser)
    add_common(parser)
    parser.set_defaults(func=cmd_caption)


