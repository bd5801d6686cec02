"""Batch captioning speed: the engine vs a plain per-image loop vs the decode+resize ceiling, side by side.

On one folder of generated JPEGs of mixed sizes (640x480 to 3000x2000), in one run:

- ceiling: open + decode + the model's preprocessing (resize, crop, to tensor) of every image, with
  no model; serially, and with the engine's worker threads;
- per-image loop: open, preprocess, caption, write, one image at a time (``Captioner.caption``);
- engine: ``run_batch`` (decoding in workers while the model runs, batched captioning, atomic writes),
  with thread and process workers, and with ``fast_decode`` (JPEG draft decoding).

Models: ``tiny`` (the test suite's tiny CLIP-prefix model) and ``full`` (GPT-2 small + open_clip
ViT-L-14 with random weights, ICG layout; built once into --cache, about 2.4 GB). Random GPT-2
weights never stop on their own, so '.' is made likelier (as in bench_clip_prefix.py) for realistic
caption lengths.

    .venv/bin/python bench/bench_batch.py --model tiny --images 256
    .venv/bin/python bench/bench_batch.py --model full --images 32
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_results_argument, append_rows, captioner_encoder, encoder_figures,  # noqa: E402
                          environment)
from captioners.batch import BatchJob, Loader, run_batch  # noqa: E402
from captioners.batch.shaping import one_line  # noqa: E402
from captioners.images import load_image  # noqa: E402
from captioners.options import DecodingOptions  # noqa: E402
from captioners.registry import create_captioner  # noqa: E402

SIZES = [(640, 480), (1024, 768), (800, 800), (480, 640), (1600, 1200), (1280, 720), (2048, 1536), (3000, 2000)]


# ---- data ------------------------------------------------------------------------------------------
def make_folder(folder: Path, count: int) -> list[Path]:
    """``count`` photo-like JPEGs of mixed sizes (kept between runs)."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        width, height = SIZES[i % len(SIZES)]
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(30):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.ellipse((x, y, x + rng.randrange(20, width // 2), y + rng.randrange(20, height // 2)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        image = image.filter(ImageFilter.GaussianBlur(1))
        noise = Image.effect_noise((width, height), 24).convert("RGB")
        Image.blend(image, noise, 0.15).save(path, quality=90)
    return paths


# ---- models ----------------------------------------------------------------------------------------
def tiny_model(cache: Path, models_dir: Path):
    model, overrides = tiny_model_files(cache)
    return create_captioner(model, models_dir, overrides)


def tiny_model_files(cache: Path) -> tuple[str, dict[str, str]]:
    """The tiny model's checkpoint and its overrides (built once into ``cache``)."""
    from tests import tiny_models

    tokenizer = tiny_models.build_tokenizer(cache / "tiny" / "tokenizer")
    config, weights = tiny_models.build_clip(cache / "tiny" / "clip")
    checkpoint = tiny_models.build_checkpoint(cache / "tiny" / "ckpt", tokenizer, "icg", stop_scale=3.0)
    return str(checkpoint.path), {"clip_config": str(config), "clip_weights": str(weights), "tokenizer": str(tokenizer)}


def full_model(cache: Path, models_dir: Path, stop_scale: float):
    model, overrides = full_model_files(cache, stop_scale)
    return create_captioner(model, models_dir, overrides)


def full_model_files(cache: Path, stop_scale: float) -> tuple[str, dict[str, str]]:
    """The full-size random model's checkpoint and its overrides (built once into ``cache``)."""
    folder = cache / "full"
    checkpoint, clip_weights, tokenizer = folder / "icg_gpt2_small.safetensors", folder / "vit_l_14.safetensors", \
        folder / "tokenizer"
    if not checkpoint.exists():
        build_full_model(folder, stop_scale)
    return str(checkpoint), {"clip_arch": "ViT-L-14", "clip_weights": str(clip_weights), "tokenizer": str(tokenizer)}


def build_full_model(folder: Path, stop_scale: float) -> None:
    import open_clip

    from bench.common import full_size_icg_model
    from captioners.weights import deduplicate_shared, save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    print(f"building the full-size random model into {folder} (once)", file=sys.stderr)
    stop = synthetic_gpt2_tokenizer(folder / "tokenizer")
    model = full_size_icg_model(stop, stop_scale)
    state = deduplicate_shared(model.state_dict(), drop=("gpt.lm_head.weight", "lm_head.weight"))
    save_safetensors(state, folder / "icg_gpt2_small.safetensors")
    clip = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    save_safetensors({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "vit_l_14.safetensors")


def synthetic_gpt2_tokenizer(folder: Path, size: int = 50257) -> int:
    """A byte-level BPE vocabulary of GPT-2's size (no download): GPT-2's 256 byte symbols in GPT-2's
    order (so '.' is id 13), pseudo-words made by merges, and <|endoftext|> last. Returns '.''s id."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {s: i for i, s in enumerate(symbols)}
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    stems = ["Ġ" + c for c in letters] + list(letters)
    merges = [f"Ġ {c}" for c in letters]
    for c in letters:
        vocab["Ġ" + c] = len(vocab)
    while len(vocab) < size - 1:
        left, right = rng.choice(stems), rng.choice(letters)
        token = left + right
        if token in vocab or len(token) > 9:
            continue
        vocab[token] = len(vocab)
        merges.append(f"{left} {right}")
        stems.append(token)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab["."]


# ---- the contenders (each returns seconds) ---------------------------------------------------------
def ceiling(paths: list[Path], preprocess, workers: int, min_side: int | None = None) -> float:
    """Open + decode + preprocess only: what any captioning run must at least do."""
    def one(path: Path) -> torch.Tensor:
        return preprocess(load_image(path, min_side=min_side))

    start = time.perf_counter()
    if workers:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, paths))
    else:
        for path in paths:
            one(path)
    return time.perf_counter() - start


def per_image_loop(captioner, paths: list[Path], out: Path, decoding: dict) -> float:
    """What a simple script (or most WebUI extensions) does: one image at a time, end to end."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in paths:
        caption = captioner.caption([load_image(path)], decoding)[0]
        (out / (path.stem + ".txt")).write_text(caption, encoding="utf-8")
    return time.perf_counter() - start


def engine(captioner, paths: list[Path], out: Path, batch_size: int, workers: int, loader: Loader,
           decoding: dict, fast_decode: bool = False) -> float:
    shutil.rmtree(out, ignore_errors=True)
    job = BatchJob(inputs=[str(p) for p in paths], output_dir=str(out), batch_size=batch_size, workers=workers,
                   loader=loader, fast_decode=fast_decode, decoding=DecodingOptions.from_mapping(decoding))
    start = time.perf_counter()
    summary = run_batch(captioner, job)
    elapsed = time.perf_counter() - start
    assert summary.captioned == len(paths) and not summary.failed, summary.failed[:3]
    return elapsed


def components(captioner, paths: list[Path], batch_size: int, decoding: dict) -> None:
    """Where a CLIP-prefix model's time goes, per image, alone and batched: the engine can only
    speed up what batching speeds up (Amdahl's bound on engine / per-image loop)."""
    preprocess = captioner.preprocessor()
    pixels = torch.stack([preprocess(load_image(p)) for p in paths[:batch_size]])
    options = captioner.decoding_options(decoding)
    count = len(pixels)
    with torch.inference_mode():
        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) / count

        encode_one = timed(lambda: [captioner.clip.encode_images(pixels[i:i + 1], captioner.normalize)
                                    for i in range(count)])
        encode_all = timed(lambda: captioner.clip.encode_images(pixels, captioner.normalize))
        prefix = captioner.model.prefix(captioner.clip.encode_images(pixels, captioner.normalize))
        decode_one = timed(lambda: [captioner.decode(prefix[i:i + 1], options) for i in range(count)])
        decode_all = timed(lambda: captioner.decode(prefix, options))
    print(f"\nper image, s ({count} images): image encoder alone {encode_one:.2f}, batched {encode_all:.2f}; "
          f"caption decoder alone {decode_one:.2f}, batched {decode_all:.2f}")
    print(f"  -> model time alone caps engine / per-image loop at "
          f"{(encode_one + decode_one) / (encode_all + decode_all):.2f}x with this model on this machine")


def bench_model(name: str, encoder_name: str, captioner, paths: list[Path], args, work: Path, full: bool) -> None:
    captioner.load(args.device)
    preprocess, size = captioner.preprocessor(), captioner.image_size
    decoding = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    bs, workers = args.batch_size, args.workers
    engine(captioner, paths[:bs], work / "warm", bs, 0, Loader.THREADS, decoding)  # warm-up
    pixels = torch.stack([preprocess(load_image(p)) for p in paths[:bs]]).to(captioner.device, captioner.dtype)
    encoder = encoder_figures(encoder_name, captioner_encoder(captioner), pixels, args.repeats)
    if args.components:
        components(captioner, paths, min(bs, len(paths)), decoding)
    contenders = [
        ("ceiling: decode+preprocess, 1 thread", lambda: ceiling(paths, preprocess, 0)),
        (f"ceiling: decode+preprocess, {workers} threads", lambda: ceiling(paths, preprocess, workers)),
        ("ceiling: fast decode (JPEG draft), 1 thread", lambda: ceiling(paths, preprocess, 0, size)),
        ("per-image loop (open, caption, write)", lambda: per_image_loop(captioner, paths, work / "loop", decoding)),
        (f"engine, {workers} worker threads",
         lambda: engine(captioner, paths, work / "threads", bs, workers, Loader.THREADS, decoding)),
        (f"engine, {workers} worker processes",
         lambda: engine(captioner, paths, work / "procs", bs, workers, Loader.PROCESSES, decoding)),
    ]
    if not full:  # decoding is a rounding error next to a full-size model on the CPU
        contenders += [
            ("engine, decoding in the main thread",
             lambda: engine(captioner, paths, work / "inline", bs, 0, Loader.THREADS, decoding)),
            (f"engine, {workers} worker threads, fast decode",
             lambda: engine(captioner, paths, work / "fast", bs, workers, Loader.THREADS, decoding, True)),
        ]
    best = {label: float("inf") for label, _ in contenders}
    for _ in range(args.repeats):  # rounds interleave the contenders, so load changes hit all of them
        for label, run in contenders:
            best[label] = min(best[label], run())
    loop_text = [one_line((work / "loop" / (p.stem + ".txt")).read_text(encoding="utf-8")) for p in paths]
    engine_text = [(work / "threads" / (p.stem + ".txt")).read_text(encoding="utf-8") for p in paths]
    cap = captioner.decoding_options(decoding).max_new_tokens
    rates = {label: len(paths) / seconds for label, seconds in best.items()}
    ceiling_rate, loop_rate = rates[contenders[0][0]], rates[contenders[3][0]]
    print(f"\n{name} model: {len(paths)} images, batch {bs}, torch threads {torch.get_num_threads()}, "
          f"device {captioner.device}, best of {args.repeats}, at most {cap} new tokens per caption")
    print(f"{'':<48} {'images/s':>9} {'x ceiling':>10} {'x loop':>8}")
    for label, rate in rates.items():
        print(f"{label:<48} {rate:>9.2f} {rate / ceiling_rate:>9.0%} {rate / loop_rate:>7.2f}x")
    print(f"engine captions identical to the per-image loop's: {engine_text == loop_text}")
    print(encoder.line())
    env = environment(captioner.device, captioner.dtype)
    append_rows("bench_batch", [{**env, "batch": bs, "images": len(paths), "measure": f"{name}: {label}",
                                 "images_per_s": round(rate, 3), **encoder.columns(),
                                 "note": f"same captions {engine_text == loop_text}"}
                                for label, rate in rates.items()], args.results)
    captioner.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "full", "both"), default="both")
    parser.add_argument("--images", type=int, default=256, help="images for the tiny model")
    parser.add_argument("--full-images", type=int, default=32, help="images for the full-size model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stop-scale", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, help="cap caption length (both sides)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best time of each contender counts")
    parser.add_argument("--components", action="store_true",
                        help="also time the image encoder and caption decoder alone and batched (CLIP-prefix)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "captioners-bench-batch"),
                        help="generated images and models are kept here between runs")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    paths = make_folder(cache / "images", max(args.images, args.full_images))
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    models_dir = cache / "models"
    try:
        if args.model in ("tiny", "both"):
            bench_model("tiny", "tiny CLIP", tiny_model(cache, models_dir), paths[: args.images], args, work,
                        full=False)
        if args.model in ("full", "both"):
            bench_model("full-size random", "ViT-L-14", full_model(cache, models_dir, args.stop_scale),
                        paths[: args.full_images], args, work, full=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
