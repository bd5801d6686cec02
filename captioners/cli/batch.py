"""``python -m captioners batch DIR... [options]``: caption training folders into sidecar files.

Exit status: 0 when the run finished (even with some bad images), 1 when every image failed,
2 when the run could not start (bad option, no images, missing weights, an output that would replace
an input), 3 when the captions were written but a combined output or the report could not be,
130 when stopped by Ctrl-C / SIGTERM (the current batch is finished and written first; a second
Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from typing import Any

from captioners.batch.job import BatchJob, ExistingPolicy, Loader, TriggerMode
from captioners.batch.report import BatchSummary, Progress
from captioners.batch.sizing import AUTO, CPU_AUTO_BATCH, GPU_LARGEST_BATCH
from captioners.cli.options import (add_common, add_decoding_options, add_judging_options, add_model_options,
                                    captioners_from_args, decoding_options, load_captioners_from_args, model_ids,
                                    model_overrides, one_line)
from captioners.errors import CaptionerError
from captioners.display import display_path, json_bytes

SHOWN_CHANGES = 20  # dry run: changes printed (all of them with --json)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("batch", help="caption folders into <stem>.txt files (training sets)",
                            description="Caption folders into <stem>.txt caption files beside the images (or "
                                        "in --output-dir), for training sets. Exit status: 0 finished, 1 every "
                                        "image failed, 2 could not start, 3 an output could not be written, "
                                        "130 stopped.")
    parser.add_argument("inputs", nargs="*", metavar="DIR_FILE_OR_GLOB",
                        help="folders, image files, quoted glob patterns ('data/**/*.png') or object storage "
                             "URIs (s3://bucket/prefix/, gs://..., file://...; they need --output-dir)")
    parser.add_argument("--recursive", "-r", action="store_true", help="look into sub-folders")
    parser.add_argument("--file-list", metavar="FILE", help="text file with one image path (or object URI) per line")

    out = parser.add_argument_group("caption files")
    out.add_argument("--output-dir", metavar="DIR", help="write captions here, mirroring the input folders "
                                                         "(default: beside each image)")
    out.add_argument("--extension", default=".txt", help="caption file extension, e.g. .caption (default .txt)")
    out.add_argument("--existing", choices=[p.value for p in ExistingPolicy], default="skip",
                     help="when a caption file exists: skip (default; reruns resume), overwrite, append, prepend")
    out.add_argument("--separator", default=", ", help="between old and new text for append/prepend "
                                                       "(default ', ')")
    out.add_argument("--no-dedupe", dest="dedupe_tags", action="store_false",
                     help="append/prepend: keep tags the existing caption already has")
    out.add_argument("--no-backup", dest="backup", action="store_false",
                     help="do not keep <caption>.bak when changing an existing caption file")
    out.add_argument("--dry-run", action="store_true", help="write nothing; show what would change")

    text = parser.add_argument_group("caption text")
    text.add_argument("--prefix", default="", help="text put before every caption, verbatim (e.g. 'photo of sks, ')")
    text.add_argument("--suffix", default="", help="text put after every caption, verbatim")
    text.add_argument("--trigger", default="", help="trigger word added to every caption")
    text.add_argument("--trigger-mode", choices=[m.value for m in TriggerMode], default="prepend",
                      help="prepend the trigger, or replace the --class-word(s) with it (default prepend)")
    text.add_argument("--class-word", dest="class_words", action="append", default=[], metavar="WORD",
                      help="word the trigger replaces in replace mode (repeatable, or comma-separated)")
    text.add_argument("--exclude", action="append", default=[], metavar="WORDS",
                      help="words or tags to remove (repeatable, or comma-separated)")
    text.add_argument("--replace", nargs=2, action="append", default=[], metavar=("REGEX", "REPLACEMENT"),
                      help="regular-expression search and replace (repeatable)")
    text.add_argument("--lowercase", action="store_true", help="lower-case the generated caption")
    text.add_argument("--strip-period", action="store_true", help="drop the trailing ' .' of Flickr-style captions")
    text.add_argument("--max-tokens", type=int, default=75,
                      help="warn about captions longer than this many CLIP tokens (0: no check; default 75)")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-size", type=number_or_auto, default=8, metavar="N|auto",
                       help="images captioned together (default 8); auto: on a GPU the largest batch that fits "
                            f"(tried from {GPU_LARGEST_BATCH} down, halving), on a CPU {CPU_AUTO_BATCH}")
    speed.add_argument("--workers", type=number_or_auto, metavar="N|auto",
                       help="local engine: image decoding workers (0: main thread; default 2; auto: one per CPU "
                            "but one, at most 8); Ray engine: captioning workers (default 1)")
    speed.add_argument("--loader", choices=[m.value for m in Loader], default="threads",
                       help="run the decoding workers as threads (default) or processes")
    speed.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 can be "
                                                   "much faster on a busy machine)")
    speed.add_argument("--fast-decode", action="store_true",
                       help="decode JPEGs at reduced size (faster on large photos; pixels differ slightly)")
    speed.add_argument("--gpu-decode", action="store_true",
                       help="on a CUDA GPU, decode JPEGs there (nvjpeg) and preprocess them there too; other "
                            "formats stay on the CPU (pixels differ slightly; local engine)")
    speed.add_argument("--cuda-graphs", action="store_true",
                       help="on a CUDA GPU, replay greedy and sampled GPT-2 decoding steps (CLIP-prefix, SBG) "
                            "as CUDA graphs: fewer kernel launches, the same captions; beams decode as usual "
                            "(local engine)")

    distributed = parser.add_argument_group("engine (Ray: pip install 'ray[data]'; see README 'More than one machine')")
    distributed.add_argument("--engine", choices=("local", "ray"), default="local",
                             help="caption in this process (default) or on a Ray cluster, same captions and files")
    distributed.add_argument("--ray-address", metavar="ADDRESS",
                             help="Ray cluster to join: auto (the one this machine belongs to) or ray://HOST:PORT "
                                  "(default: start a local one)")
    distributed.add_argument("--gpus-per-worker", type=float, metavar="F",
                             help="GPUs per captioning worker, fractions share one (default: 1 when the cluster "
                                  "has GPUs, else 0)")
    distributed.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="F",
                             help="CPUs reserved per captioning worker, also its torch threads; CPU workers "
                                  "read their own images (default 1)")
    distributed.add_argument("--table-dir", metavar="DIR",
                             help="result table (one row per image, reruns resume from it; default: a hidden "
                                  "folder named after the job beside the caption files)")
    distributed.add_argument("--table-format", choices=("parquet", "jsonl"), default="parquet",
                             help="result table shards: Parquet (default) or JSON lines")

    combined = parser.add_argument_group("combined outputs")
    combined.add_argument("--jsonl", metavar="FILE", help="also write path, caption, model and options per line")
    combined.add_argument("--csv", metavar="FILE", help="also write a path,caption,model CSV")
    combined.add_argument("--kohya-json", metavar="FILE",
                          help="merge captions into kohya fine-tuning metadata {image_key: {caption: ...}}")
    combined.add_argument("--kohya-full-path", action="store_true",
                          help="kohya keys are absolute image paths (default: file stems)")
    combined.add_argument("--report", metavar="FILE", help="write the summary, every failure and its reason as JSON")
    combined.add_argument("--report-html", metavar="FILE",
                          help="write the dataset report: caption lengths, frequent words/tags, duplicates, "
                               "CLIPScores and flagged captions with thumbnails, in one HTML file")
    combined.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    out.add_argument("--join", action="store_true",
                     help="several captions per image: one line joined by --separator (default: one per line)")

    add_model_options(parser)
    add_decoding_options(parser)
    add_judging_options(parser, budget=False)
    add_common(parser)
    parser.set_defaults(func=cmd_batch)


def number_or_auto(text: str) -> int | str:
    """argparse type of --batch-size and --workers: a whole number, or auto."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number or auto (got {text!r})") from None


def job_from_args(args: argparse.Namespace) -> BatchJob:
    shaping = {"prefix": args.prefix, "suffix": args.suffix, "trigger": args.trigger,
               "trigger_mode": args.trigger_mode, "class_words": _split(args.class_words),
               "exclude": _split(args.exclude), "replacements": [list(p) for p in args.replace],
               "lowercase": args.lowercase, "strip_period": args.strip_period, "max_tokens": args.max_tokens}
    job = BatchJob.from_mapping({
        "inputs": args.inputs, "recursive": args.recursive, "file_list": args.file_list,
        "output_dir": args.output_dir, "extension": args.extension, "existing": args.existing,
        "separator": args.separator, "dedupe_tags": args.dedupe_tags, "backup": args.backup,
        "dry_run": args.dry_run, "shaping": shaping, "batch_size": args.batch_size,
        "workers": 2 if args.workers is None or args.engine == "ray" else args.workers,
        "loader": args.loader, "fast_decode": args.fast_decode, "gpu_decode": args.gpu_decode,
        "cuda_graphs": args.cuda_graphs, "jsonl": args.jsonl, "csv": args.csv,
        "kohya_json": args.kohya_json, "kohya_full_path": args.kohya_full_path, "report": args.report,
        "report_html": args.report_html, "join": args.join,
        "judging": {"score": args.score, "score_clip": args.score_clip, "t5_max_tokens": args.t5_max_tokens,
                    "trim_to_budget": args.trim_to_budget, "on_flag": args.on_flag}})
    job.decoding = decoding_options(args)
    return job


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def cmd_batch(args: argparse.Namespace) -> int:
    from captioners.batch.runner import plan_job, run_batch

    if not args.inputs and not args.file_list:
        raise CaptionerError("Give at least one folder, image or glob pattern (or --file-list).")
    job = job_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    plan = plan_job(job)  # bad inputs fail here, before the model is loaded
    engine = ray_engine(args) if args.engine == "ray" else None
    captioners = captioners_from_args(args, job.judging) if engine else load_captioners_from_args(args, job.judging)
    stop = StopOnSignal()
    # The Ray engine shows Ray Data's own progress bars.
    with stop, ProgressBar(disable=args.quiet or args.json or engine is not None) as bar:
        summary = run_batch(captioners, job, on_progress=bar.update, should_stop=stop, plan=plan,
                            swap_models=len(captioners) > 1, engine=engine)
    _reconfigure_stdout()
    if args.json:
        print(json_bytes(summary.to_dict(), indent=2).decode("utf-8"))  # names with bad bytes as \udcXX
    else:
        print_summary(summary)
    return exit_status(summary)


def ray_engine(args: argparse.Namespace):
    from captioners.batch.ray_engine import RayEngine, RaySettings
    from captioners.batch.steps import ModelRequest
    from captioners.paths import resolve_models_dir

    if args.workers == AUTO:
        raise CaptionerError("--workers auto is for the local engine; give the Ray engine a number of workers.")
    if args.workers is not None and args.workers < 1:
        raise CaptionerError(f"--workers must be 1 or more with --engine ray (got {args.workers}).")
    settings = RaySettings(address=args.ray_address, workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, table_dir=args.table_dir,
                           table_format=args.table_format, progress=not (args.quiet or args.json))
    request = ModelRequest(tuple(model_ids(args)), str(resolve_models_dir(args.models_dir)), model_overrides(args),
                           args.device, args.dtype)
    return RayEngine(settings, request)


def exit_status(summary: BatchSummary) -> int:
    """See the module docstring; the first that applies."""
    if summary.interrupted:
        return 130
    if summary.output_failures:
        return 3
    every_image_failed = bool(summary.failed) and not (summary.captioned or summary.skipped or summary.resumed)
    return 1 if every_image_failed else 0


class StopOnSignal:
    """First Ctrl-C (or SIGTERM): finish the current batch and stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the current batch (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class ProgressBar:
    """tqdm on stderr (only on a terminal): n/N, images/s and ETA, counts of each outcome."""

    def __init__(self, disable: bool):
        self.disable = disable
        self.bar = None

    def update(self, progress: Progress) -> None:
        if self.bar is None:
            from tqdm import tqdm

            # Skipped images are counted as 'initial' so they do not inflate the rate and ETA.
            self.bar = tqdm(total=progress.total, initial=progress.done, unit="img", file=sys.stderr,
                            dynamic_ncols=True, disable=True if self.disable else None)
        self.bar.update(progress.done - self.bar.n)
        self.bar.set_postfix(captioned=progress.captioned, skipped=progress.skipped, failed=progress.failed,
                             refresh=False)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(summary: BatchSummary) -> None:
    """The summary as text; every path on one line whatever its name holds (see captioners.display)."""
    verb = "would caption" if summary.dry_run else "captioned"
    resumed = f", {summary.resumed} done by an earlier run of this job" if summary.resumed else ""
    print(f"{verb} {summary.captioned}, skipped {summary.skipped} (caption exists){resumed}, failed "
          f"{len(summary.failed)} of {summary.total} images in {summary.elapsed_s:.1f} s "
          f"({summary.images_per_s:.2f} images/s)" + (" - stopped early; rerun to caption the rest"
                                                       if summary.interrupted else ""))
    print_stages(summary)
    print_judging(summary)
    for title, pairs in (("failed", summary.failed), ("warnings", summary.warnings),
                         ("not written", summary.output_failures)):
        if pairs:
            print(f"{title} ({len(pairs)}):")
            for path, reason in pairs:
                print(f"  {display_path(path)}: {one_line(reason)}")
    if summary.dry_run:
        actions = Counter(change["action"] for change in summary.changes if change["image"])
        print("dry run, nothing written; would " + (", ".join(f"{k} {v}" for k, v in sorted(actions.items()))
                                                     or "change nothing"))
        for change in summary.changes[:SHOWN_CHANGES]:
            print(f"  {change['action']:<9} {display_path(change['caption_file'])}: {one_line(str(change['new']))}")
        if len(summary.changes) > SHOWN_CHANGES:
            print(f"  ... {len(summary.changes) - SHOWN_CHANGES} more (see --json)")
    elif summary.backups:
        print(f"backups of replaced files: {len(summary.backups)} (*.bak)")
    if summary.resumed and summary.journal:
        print(f"run journal: {display_path(summary.journal)} (delete it to apply --existing to those images again)")


def print_stages(summary: BatchSummary) -> None:
    """Where the local engine's time went; the waiting share is the model's (on a GPU: the GPU's) idle time."""
    stages = summary.stages
    if not stages or stages["data_wait"] is None:
        return
    print(f"batch size {stages['batch_size']}: waited for images {stages['data_wait']:.0%} of the time "
          f"({stages['waiting_s']:.1f} s), captioning {stages['captioning_s']:.1f} s, "
          f"writing {stages['writing_s']:.1f} s")


def print_judging(summary: BatchSummary) -> None:
    """CLIPScores of the run and the quality gates: counts per gate, then the flagged captions."""
    if summary.clip_score:
        s = summary.clip_score
        low = (f"; low_score at or below {summary.low_score_threshold:.3f}"
               if summary.low_score_threshold is not None else "")
        print(f"CLIPScore: mean {s['mean']:.3f}, median {s['median']:.3f}, min {s['min']:.3f}, max {s['max']:.3f} "
              f"({s['count']} captions{low})")
    if summary.flagged_total:
        counts = ", ".join(f"{code} {count}" for code, count in summary.flags.items() if count)
        skipped = f"; {summary.flag_skipped} not written (--on-flag skip)" if summary.flag_skipped else ""
        print(f"flagged ({summary.flagged_total}): {counts}{skipped}")
        for entry in summary.flagged[:SHOWN_CHANGES]:
            print(f"  {display_path(entry['image'])}: {'; '.join(entry['messages'])} [{entry['action']}]: "
                  f"{one_line(entry['caption'])[:120]}")
        if summary.flagged_total > SHOWN_CHANGES:
            print(f"  ... {summary.flagged_total - SHOWN_CHANGES} more (see --json, --report or --report-html)")
    if summary.report_html:
        print(f"dataset report: {display_path(summary.report_html)}")


def _reconfigure_stdout() -> None:
    """Unicode file names must not crash the summary on a console that is not UTF-8."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure:
        reconfigure(errors="backslashreplace")
