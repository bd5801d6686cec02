"""The Ray engine vs the local engine on one machine, side by side in one run.

The same folder of generated JPEGs (bench_batch.py's mixed sizes) is captioned into caption files by:

- the local engine (``run_batch``: decoding threads, batched captioning), the model loaded for the job;
- the Ray engine with 1 and with 2 captioning workers on a local cluster (preprocess on CPU tasks,
  captioning actors that each load the model, rows into the result table, then the same writer).

Each contender's time is one whole job: model loading, captioning and writing (the cluster itself is
started once, before the clock, as a long-lived cluster would be). The captions of every contender
are compared with the local engine's.

Two rates per contender: the whole job's, and the steady rate a long job approaches, measured as
(N - n) / (T(N) - T(n)) from a job of N images and one of n (``--short-images``), which cancels
what every job pays once (the Ray workers' start: a process each, importing torch, open_clip and
transformers, loading the model). The job's start, T(n) - n / steady, is printed too.

Each Ray worker gets the machine's CPUs divided among the workers: CPU workers read their own images
(see captioners/batch/ray_engine.py), so they may hold every CPU.

    .venv/bin/python bench/bench_ray.py --model tiny --images 256
    .venv/bin/python bench/bench_ray.py --model full --full-images 32
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_batch import full_model_files, make_folder, tiny_model_files  # noqa: E402
from bench.common import (add_results_argument, append_rows, captioner_encoder, encoder_figures,  # noqa: E402
                          environment)
from captioners.batch import BatchJob, run_batch  # noqa: E402
from captioners.batch.ray_engine import RayEngine, RaySettings  # noqa: E402
from captioners.batch.steps import ModelRequest  # noqa: E402
from captioners.registry import create_captioner  # noqa: E402


def job_for(paths: list[Path], out: Path, batch_size: int) -> BatchJob:
    shutil.rmtree(out, ignore_errors=True)
    return BatchJob(inputs=[str(p) for p in paths], output_dir=str(out), batch_size=batch_size, workers=2)


def local_job(request: ModelRequest, paths: list[Path], out: Path, batch_size: int) -> float:
    start = time.perf_counter()
    captioners = [c.load(request.device, request.dtype) for c in request.captioners()]
    summary = run_batch(captioners, job_for(paths, out, batch_size))
    for captioner in captioners:
        captioner.unload()
    assert summary.captioned == len(paths) and not summary.failed, summary.failed[:3]
    return time.perf_counter() - start


def ray_job(request: ModelRequest, paths: list[Path], out: Path, batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    cpus = (os.cpu_count() or 2) / workers  # CPU workers read their own images: nothing else needs a CPU
    settings = RaySettings(workers=workers, cpus_per_worker=cpus, table_dir=str(out / "table"), progress=False)
    engine = RayEngine(settings, request)
    summary = run_batch(request.captioners(), job_for(paths, out, batch_size), engine=engine)
    assert summary.captioned == len(paths) and not summary.failed, summary.failed[:3]
    return time.perf_counter() - start


def captions(out: Path, paths: list[Path]) -> list[str]:
    return [(out / (p.stem + ".txt")).read_text(encoding="utf-8") for p in paths]


def encoder_of(request: ModelRequest, paths: list[Path], batch_size: int, name: str):
    """The job's image encoder, measured in this process on one batch (see bench/common.py)."""
    from captioners.images import load_image

    captioner = request.captioners()[0].load(request.device, request.dtype)
    preprocess = captioner.preprocessor()
    pixels = torch.stack([preprocess(load_image(p)) for p in paths[:batch_size]]).to(captioner.device, captioner.dtype)
    figures = encoder_figures(name, captioner_encoder(captioner), pixels)
    env = environment(captioner.device, captioner.dtype)
    captioner.unload()
    return figures, env


def bench(name: str, request: ModelRequest, paths: list[Path], args, work: Path) -> None:
    bs, short = args.batch_size, min(args.short_images, len(paths) // 2)
    contenders = {"local engine (2 decoding threads)": lambda some: local_job(request, some, work / "local", bs)}
    for workers in args.ray_workers:
        contenders[f"Ray engine, {workers} worker{'s' if workers > 1 else ''}"] = (
            lambda some, w=workers: ray_job(request, some, work / f"ray{w}", bs, w))
    best = {(label, n): float("inf") for label in contenders for n in (short, len(paths))}
    for _ in range(args.repeats):  # rounds interleave the contenders, so load changes hit all of them
        for n in (short, len(paths)):  # the full job last: its caption files are compared below
            for label, run in contenders.items():
                best[label, n] = min(best[label, n], run(paths[:n]))
    reference = captions(work / "local", paths)
    whole = {label: len(paths) / best[label, len(paths)] for label in contenders}
    steady = {label: (len(paths) - short) / max(1e-9, best[label, len(paths)] - best[label, short])
              for label in contenders}
    local = next(iter(contenders))
    print(f"\n{name} model: {len(paths)} images (steady rate from jobs of {len(paths)} and {short}), batch {bs}, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'':<36} {'whole job':>10} {'x local':>8} {'steady':>8} {'x local':>8} {'start s':>8}  same captions")
    for label, folder in zip(contenders, ["local"] + [f"ray{w}" for w in args.ray_workers]):
        same = captions(work / folder, paths) == reference
        start = best[label, short] - short / steady[label]
        print(f"{label:<36} {whole[label]:>10.2f} {whole[label] / whole[local]:>7.0%} {steady[label]:>8.2f} "
              f"{steady[label] / steady[local]:>7.0%} {start:>8.1f}  {same}")
    encoder, env = encoder_of(request, paths, bs, "ViT-L-14" if name.startswith("full") else "tiny CLIP")
    print(encoder.line())
    rows = [{**env, "batch": bs, "images": len(paths), "measure": f"{name}: {label}",
             "images_per_s": round(whole[label], 3), **encoder.columns()} for label in contenders]
    rows += [{**env, "batch": bs, "images": len(paths), "measure": f"{name}: {label}, steady",
              "images_per_s": round(steady[label], 3), **encoder.columns(),
              "note": f"(N - n) / (T(N) - T(n)), n = {short}"} for label in contenders]
    append_rows("bench_ray", rows, args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "full", "both"), default="both")
    parser.add_argument("--images", type=int, default=256, help="images for the tiny model")
    parser.add_argument("--full-images", type=int, default=32, help="images for the full-size model")
    parser.add_argument("--short-images", type=int, default=32,
                        help="images of the short job that the steady rate is measured against")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2], help="Ray captioning workers to try")
    parser.add_argument("--stop-scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best time of each contender counts")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "captioners-bench-batch"),
                        help="generated images and models are kept here between runs (shared with bench_batch)")
    add_results_argument(parser)
    args = parser.parse_args()
    import ray

    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache)
    paths = make_folder(cache / "images", max(args.images, args.full_images))
    models_dir = cache / "models"
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        if args.model in ("tiny", "both"):
            model, overrides = tiny_model_files(cache)
            bench("tiny", ModelRequest((model,), str(models_dir), overrides, "cpu"), paths[: args.images], args, work)
        if args.model in ("full", "both"):
            model, overrides = full_model_files(cache, args.stop_scale)
            create_captioner(model, models_dir, overrides)  # a bad path fails here, not in a worker
            bench("full-size random", ModelRequest((model,), str(models_dir), overrides, "cpu"),
                  paths[: args.full_images], args, work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
