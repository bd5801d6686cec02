"""The Ray engine vs the local engine on one machine, side by side in one run.

The same folder of generated JPEGs (bench_batch.py's mixed sizes) is captioned into caption files by:

- the local engine (``run_batch``: decoding threads, batched captioning), the model loaded for the job;
- the Ray engine with 1 and with 2 captioning workers on a local cluster (preprocess on CPU tasks,
  captioning actors that each load the model, rows into the result table, then the same writer).

Each contender's time is one whole job: model loading, captioning and writing (the cluster itself is
started once, before the clock, as a long-lived cluster would be). The captions of every contender
are compared with the local engine's.

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
    # Each worker reserves a share of the CPUs that leaves one for the preprocessing tasks.
    cpus = max(0.1, min(1.0, ((os.cpu_count() or 2) - 1) / workers))
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
    bs = args.batch_size
    contenders = {"local engine (2 decoding threads)": lambda: local_job(request, paths, work / "local", bs)}
    for workers in args.ray_workers:
        contenders[f"Ray engine, {workers} worker{'s' if workers > 1 else ''}"] = (
            lambda w=workers: ray_job(request, paths, work / f"ray{w}", bs, w))
    best = {label: float("inf") for label in contenders}
    for _ in range(args.repeats):  # rounds interleave the contenders, so load changes hit all of them
        for label, run in contenders.items():
            best[label] = min(best[label], run())
    reference = captions(work / "local", paths)
    rates = {label: len(paths) / seconds for label, seconds in best.items()}
    local_rate = next(iter(rates.values()))
    print(f"\n{name} model: {len(paths)} images, batch {bs}, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'':<40} {'images/s':>9} {'x local':>8}  same captions")
    for (label, rate), folder in zip(rates.items(), ["local"] + [f"ray{w}" for w in args.ray_workers]):
        same = captions(work / folder, paths) == reference
        print(f"{label:<40} {rate:>9.2f} {rate / local_rate:>7.0%}  {same}")
    encoder, env = encoder_of(request, paths, bs, "ViT-L-14" if name.startswith("full") else "tiny CLIP")
    print(encoder.line())
    append_rows("bench_ray", [{**env, "batch": bs, "images": len(paths), "measure": f"{name}: {label}",
                               "images_per_s": round(rate, 3), **encoder.columns()}
                              for label, rate in rates.items()], args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "full", "both"), default="both")
    parser.add_argument("--images", type=int, default=256, help="images for the tiny model")
    parser.add_argument("--full-images", type=int, default=32, help="images for the full-size model")
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
