"""Folder -> caption sidecars through the batch engine: images/s and the fraction of time the model
(on a GPU: the GPU) waited for decoded images, per model family and batch size, in one run.

What ``python -m captioners batch FOLDER`` does, timed: bench_batch.py's folder of generated JPEGs
(640x480 to 3000x2000), the local engine (decoding workers, pinned memory on CUDA), one ``.txt``
per image. The data wait is the engine's own measure (``BatchSummary.stages``: time blocked on the
loader / waiting + captioning + writing). Models have random weights, built once into --cache:

- ``clip-prefix``: GPT-2 small + ICG MLP mapper + open_clip ViT-L-14 (bench_batch.py's full model);
- ``fusecap``: BLIP-base, ViT-B/16 at 384 px (bench_fusecap_sbg.py's), 3 beams;
- ``tiny``: the test suite's tiny CLIP-prefix model (a smoke test of this script on any machine).

    .venv/bin/python bench/bench_sidecars.py --family clip-prefix fusecap --batch-size 64 256 --dtype fp16
    bench/gpu.sh    # the same on a GPU machine, in one command
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_batch import full_model_files, make_folder, tiny_model_files  # noqa: E402
from bench.common import (add_results_argument, append_rows, captioner_encoder, encoder_figures,  # noqa: E402
                          environment)
from captioners.batch import BatchJob, run_batch  # noqa: E402
from captioners.batch.sizing import AUTO, auto_workers  # noqa: E402
from captioners.images import load_image  # noqa: E402
from captioners.registry import create_captioner  # noqa: E402

ENCODERS = {"tiny": "tiny CLIP", "clip-prefix": "ViT-L-14", "fusecap": "BLIP ViT-B/16 384px"}
GRAPHED = ("tiny", "clip-prefix")  # families whose GPT-2 steps --cuda-graphs replays


def model_files(family: str, cache: Path, stop_scale: float) -> tuple[str, dict[str, str]]:
    if family == "tiny":
        return tiny_model_files(cache)
    if family == "clip-prefix":
        return full_model_files(cache, stop_scale)
    from bench.bench_fusecap_sbg import build_fusecap_folder

    folder = cache / "fusecap" / "FuseCap"
    if not (folder / "config.json").exists():
        print(f"building the random FuseCap (BLIP-base) model into {folder} (once)", file=sys.stderr)
        build_fusecap_folder(folder, logit_scale=10.0, sep_bias=16.0)
    return str(folder), {}


def batch_size(text: str) -> int | str:
    return AUTO if text == AUTO else int(text)


def sidecars(captioner, images: list[Path], out: Path, size: int | str, workers: int | str, fast: bool,
             gpu_decode: bool = False, cuda_graphs: bool = False):
    """One whole folder -> sidecars run; its summary."""
    shutil.rmtree(out, ignore_errors=True)
    job = BatchJob(inputs=[str(p) for p in images], output_dir=str(out), batch_size=size, workers=workers,
                   fast_decode=fast, gpu_decode=gpu_decode, cuda_graphs=cuda_graphs)
    summary = run_batch(captioner, job)
    assert summary.captioned == len(images) and not summary.failed, summary.failed[:3]
    return summary


def bench_family(family: str, args, images: list[Path], work: Path) -> None:
    model, overrides = model_files(family, Path(args.cache), args.stop_scale)
    captioner = create_captioner(model, Path(args.cache) / "models", overrides).load(args.device, args.dtype)
    sidecars(captioner, images[:8], work / "warm-up", 8, args.workers, args.fast_decode)
    preprocess = captioner.preprocessor()
    encoder_batch = min(args.encoder_batch, len(images))
    pixels = torch.stack([preprocess(load_image(p)) for p in images[:encoder_batch]])
    encoder = encoder_figures(ENCODERS[family], captioner_encoder(captioner),
                              pixels.to(captioner.device, captioner.dtype))
    env = environment(captioner.device, captioner.dtype)
    workers = auto_workers() if args.workers == AUTO else args.workers
    print(f"\n{family}: {len(images)} images -> sidecars, {env['device']} {env['dtype']}, {workers} decoding workers")
    print(f"{'JPEGs':>5} {'graphs':>6} {'batch':>7} {'images/s':>9} {'data wait':>10} {'waiting s':>10} "
          f"{'captioning s':>13} {'writing s':>10}")
    rows = []
    graphs = args.graphs if family in GRAPHED else ["off"]  # FuseCap's BLIP decoder takes no CUDA graphs
    for size, decode, graph in itertools.product(args.batch_size, args.decode, graphs):
        summary = sidecars(captioner, images, work / f"{family}-{size}-{decode}-{graph}", size, args.workers,
                           args.fast_decode, gpu_decode=decode == "gpu", cuda_graphs=graph == "on")
        stages = summary.stages
        print(f"{decode:>5} {graph:>6} {stages['batch_size']:>7} {summary.images_per_s:>9.2f} "
              f"{stages['data_wait']:>9.1%} {stages['waiting_s']:>10.2f} {stages['captioning_s']:>13.2f} "
              f"{stages['writing_s']:>10.2f}")
        rows.append({**env, "batch": stages["batch_size"], "images": len(images),
                     "measure": f"{family} folder -> sidecars, JPEGs decoded on the {decode.upper()}"
                                + (", CUDA graphs" if graph == "on" else "") + (" (batch auto)" if size == AUTO else ""),
                     "images_per_s": round(summary.images_per_s, 3), "data_wait": round(stages["data_wait"], 4),
                     **encoder.columns(), "note": f"workers {workers}, fast decode {args.fast_decode}"})
    print(encoder.line())
    append_rows("bench_sidecars", rows, args.results)
    captioner.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=tuple(ENCODERS), default=["clip-prefix", "fusecap"])
    parser.add_argument("--batch-size", nargs="+", type=batch_size, default=[64, 256], help="sizes, or auto")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default=AUTO, help="decoding workers (default auto: CPUs - 1, at most 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: fp16 on CUDA, fp32 on a CPU")
    parser.add_argument("--fast-decode", action="store_true", help="JPEG draft decoding (pixels differ slightly)")
    parser.add_argument("--decode", nargs="+", choices=("cpu", "gpu"), default=["cpu"],
                        help="where JPEGs are decoded: the workers (cpu) or the GPU (gpu: --gpu-decode; "
                             "without a CUDA GPU it falls back to the CPU); both: side by side")
    parser.add_argument("--graphs", nargs="+", choices=("off", "on"), default=["off"],
                        help="clip-prefix: decoding steps as usual (off) or replayed as CUDA graphs (on: "
                             "--cuda-graphs; CUDA only)")
    parser.add_argument("--encoder-batch", type=int, default=64, help="batch of the encoder GFLOP/s measure")
    parser.add_argument("--stop-scale", type=float, default=4.0, help="clip-prefix: as bench_batch.py")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "captioners-bench-batch"),
                        help="generated images and models are kept here between runs (shared with bench_batch)")
    add_results_argument(parser)
    args = parser.parse_args()
    args.workers = AUTO if args.workers == AUTO else int(args.workers)
    images = make_folder(Path(args.cache) / "images", args.images)
    work = Path(tempfile.mkdtemp(prefix="bench-sidecars-"))
    try:
        for family in args.family:
            bench_family(family, args, images, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
