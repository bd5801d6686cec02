"""CLIP-prefix decoding speed: per-image reference vs batched KV-cached path, side by side.

Builds full-size models with random weights (GPT-2 small + ICG MLP mapper, open_clip ViT-L-14),
no download. The '.' token's embedding is scaled up so random captions end at mixed lengths
instead of always running to 67 tokens (which flatters the cached path even more).

    .venv/bin/python bench/bench_clip_prefix.py [--images 16] [--batch-size 16] [--device cpu]

The batched path is timed ``--repeats`` times and its best time is kept (a shared machine's load
only ever slows a run down). ``--skip-reference`` times the batched path alone: the per-image
reference takes minutes on a CPU and does not change with the package's code.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_results_argument, append_rows, encoder_figures, environment,  # noqa: E402
                          full_size_icg_model, photos, timed)
from captioners.clip_backbone import ClipBackbone, ClipSpec  # noqa: E402
from captioners.families.clipcap_modules import ClipPrefixModel  # noqa: E402
from captioners.prefix_decoding import beam_search, decode_tokens, greedy_chooser  # noqa: E402
from tests.reference_decoding import reference_beam, reference_greedy  # noqa: E402

STOP = 13  # GPT-2's '.'


def build_model(device: torch.device, dtype: torch.dtype, stop_scale: float) -> ClipPrefixModel:
    return full_size_icg_model(STOP, stop_scale).to(device, dtype)


def reference_all(model, prefixes, beam: bool):
    decode = reference_beam if beam else reference_greedy
    return [decode(model.gpt, p, STOP) for p in prefixes]


def batched_all(model, prefixes, batch_size: int, beam: bool):
    out = []
    for start in range(0, len(prefixes), batch_size):
        chunk = prefixes[start:start + batch_size]
        if beam:
            out += beam_search(model.gpt, chunk, STOP, 67, 5)
        else:
            out += decode_tokens(model.gpt, chunk, STOP, 67, greedy_chooser())
    return out


def best_of(repeats: int, fn):
    """``(result, seconds)`` of the fastest of ``repeats`` runs of ``fn``."""
    runs = [timed(fn) for _ in range(max(1, repeats))]
    return runs[0][0], min(seconds for _, seconds in runs)


def load_clip(device, dtype):
    """open_clip's ViT-L-14 (random weights), its preprocessing, and the package's backbone around it
    (on a CPU: our own ViT forward, captioners/vit_encoder.py)."""
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None, force_quick_gelu=True)
    model = model.eval().requires_grad_(False).to(device, dtype)
    return model, preprocess, ClipBackbone(model, preprocess, None, ClipSpec())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stop-scale", type=float, default=32.0,
                        help="scale of the '.' embedding: 32 gives captions of 1-67 tokens (mean ~20); "
                             "1 never stops early (every caption 67 tokens, the worst case)")
    parser.add_argument("--end-to-end-stop-scale", type=float, default=6.0,
                        help="the '.' scale of the end-to-end rows' mixed-length captions: 6 gives the 16 photos "
                             "1-67 tokens (mean ~25); the --stop-scale row after it is the short-caption case")
    parser.add_argument("--skip-clip", action="store_true", help="decoding only, no end-to-end row")
    parser.add_argument("--skip-reference", action="store_true",
                        help="time the batched decoding only (no per-image reference, no speed-up column)")
    parser.add_argument("--repeats", type=int, default=1, help="time the batched path this many times, keep the best")
    add_results_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"device {device} ({dtype}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.images} images, batch {args.batch_size}")

    model = build_model(device, dtype, args.stop_scale)
    torch.manual_seed(1)
    embeddings = torch.randn(args.images, 768, device=device)
    embeddings /= embeddings.norm(dim=-1, keepdim=True)
    with torch.inference_mode():
        prefixes = model.prefix(embeddings)
    batched_all(model, prefixes[:2], 2, beam=False)  # warm-up

    rows = []
    for name, beam in (("greedy", False), ("beam 5", True)):
        with torch.inference_mode():
            ref, ref_s = (None, None) if args.skip_reference else timed(lambda: reference_all(model, prefixes, beam))
            got, got_s = best_of(args.repeats, lambda: batched_all(model, prefixes, args.batch_size, beam))
        lengths = [len(t) for t in got]
        rows.append((name, ref_s, got_s, ref == got if ref is not None else None,
                     statistics.mean(lengths), min(lengths), max(lengths)))

    print("\ndecoding only (GPT-2 small, prefix 10, random weights)")
    print(f"{'strategy':<8} {'reference img/s':>16} {'batched img/s':>14} {'speed-up':>9} {'same tokens':>12} "
          f"{'tokens mean/min/max':>20}")
    for name, ref_s, got_s, same, mean, low, high in rows:
        ref_rate = f"{args.images / ref_s:.2f}" if ref_s else "-"
        speedup = f"{ref_s / got_s:.1f}x" if ref_s else "-"
        print(f"{name:<8} {ref_rate:>16} {args.images / got_s:>14.2f} {speedup:>9} {str(same):>12} "
              f"{mean:>10.1f}/{low}/{high}")

    clip, preprocess, backbone = load_clip(device, dtype)
    images = photos(args.images)
    pixels = torch.stack([preprocess(i) for i in images[:args.batch_size]]).to(device, dtype)
    encoder = encoder_figures("ViT-L-14", lambda p: backbone.encode_images(p, True), pixels, args.repeats)
    print(f"\n{encoder.line()}")
    env = {**environment(device, dtype), "batch": args.batch_size, "images": args.images, **encoder.columns()}
    results = [{**env, "measure": f"decoding {name}, {who}", "images_per_s": round(args.images / s, 4),
                "note": f"tokens mean {mean:.1f}, same tokens {same}"}
               for name, ref_s, got_s, same, mean, _, _ in rows
               for who, s in (("per-image reference", ref_s), ("batched", got_s)) if s]
    if args.skip_clip or args.skip_reference:
        append_rows("bench_clip_prefix", results, args.results)
        return

    def reference_pipeline(model):  # ClipCap's own: open_clip's encode_image, then greedy, one image at a time
        out = []
        for image in images:
            pixels = preprocess(image).unsqueeze(0).to(device, dtype)
            features = clip.encode_image(pixels).float()
            features /= features.norm(dim=-1, keepdim=True)
            out.append(reference_greedy(model.gpt, model.prefix(features)[0], STOP))
        return out

    def batched_pipeline(model):
        out = []
        for start in range(0, len(images), args.batch_size):
            pixels = torch.stack([preprocess(i) for i in images[start:start + args.batch_size]])
            features = backbone.encode_images(pixels, normalize=True)
            out += decode_tokens(model.gpt, model.prefix(features), STOP, 67, greedy_chooser())
        return out

    print("\nend to end, greedy (photo -> preprocess -> CLIP ViT-L-14 -> mapper -> GPT-2); reference: open_clip's "
          "encode_image and greedy decoding per image; batched: the package's encoder and decoder")
    print(f"{'captions':<16} {'reference img/s':>16} {'batched img/s':>14} {'speed-up':>9} {'same tokens':>12} "
          f"{'tokens mean/min/max':>20}")
    # The photos' prefixes through this random CLIP end sooner than random embeddings' do: the '.'
    # scale that gives them mixed lengths is smaller (--end-to-end-stop-scale).
    for label, scale in (("mixed lengths", args.end_to_end_stop_scale), ("short", args.stop_scale)):
        e2e_model = build_model(device, dtype, scale)
        with torch.inference_mode():
            ref, ref_s = timed(lambda: reference_pipeline(e2e_model))
            got, got_s = timed(lambda: batched_pipeline(e2e_model))
        lengths = [len(t) for t in got]
        tokens = f"{statistics.mean(lengths):.1f}/{min(lengths)}/{max(lengths)}"
        print(f"{label:<16} {args.images / ref_s:>16.2f} {args.images / got_s:>14.2f} {ref_s / got_s:>8.1f}x "
              f"{str(ref == got):>12} {tokens:>20}")
        results += [{**env, "measure": f"end to end greedy, {label} captions, {who}",
                     "images_per_s": round(args.images / s, 4),
                     "note": f"same tokens {ref == got}, tokens mean/min/max {tokens}, stop scale {scale}"}
                    for who, s in (("per-image reference", ref_s), ("batched", got_s))]
    append_rows("bench_clip_prefix", results, args.results)


if __name__ == "__main__":
    main()
