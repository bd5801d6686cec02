"""What judging costs on top of CLIP-prefix captioning: CLIPScore, N beam candidates, guidance.

Three ratios, side by side in one run, each against the goal set for it:

1. scoring overhead: CLIPScore of the greedy captions (one per image) through ``score_groups``, with
   the same ViT-L-14 CLIP the captioner encoded the images with: text encoding + cosine, the image
   embedding reused (no second image encode), divided by the captioning time of the same images
   (CLIP image encode + mapper prefix + GPT-2 greedy decoding). Goal < 10%. For reference, also
   what scoring would cost without the reuse (a second image encode + the text encode).
2. ``beam_candidates(..., beam_size=5, count=5)`` vs ``beam_search(..., 5)`` on the same prefixes.
   Goal < 1.1x; the first candidate of each image must be beam_search's caption.
3. specificity guidance 1.0 (null prefix: the mapper applied to an all-zero CLIP embedding) vs
   plain greedy ``decode_tokens``. Goal < 1.3x; guidance 0.0 must give exactly the unguided tokens.
   Guidance changes the captions and so their lengths, which alone can move that ratio either way;
   a second row decodes both with no stop token, exactly --fixed-steps tokens each: the cost per token.

Full-size models with random weights (GPT-2 small + ICG MLP mapper, open_clip ViT-L-14 with
QuickGELU), built in memory, no download. As in bench_clip_prefix.py the '.' embedding is scaled
(--stop-scale 32); but from the random CLIP's image embeddings (not bench_clip_prefix's random unit
vectors) the greedy captions are only 1-3 tokens, hence the fixed-length guidance row. There is no GPT-2 tokenizer offline, so caption
texts come from a stand-in detokenizer that keeps their length: token id t becomes the word
``WORDS[t % len(WORDS)]`` of ~200 common English words, so a 12-token caption is a 12-word text
(open_clip pads every text to 77 tokens anyway, so text length barely changes the text encode).
Images are preprocessed once, outside the timings (the product does that in its loader workers).
Each timing is the fastest of --repeats runs (the least disturbed by other work on the machine),
after one warm-up run on two images; baseline and feature runs alternate within each repeat, and
every repeat's seconds are printed after the table.

    .venv/bin/python bench/bench_judging.py [--images 16] [--batch-size 16] [--repeats 2] [--threads N]
                                            [--device cpu] [--fixed-steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (add_results_argument, append_rows, encoder_figures, environment,  # noqa: E402
                          full_size_icg_model, photos, timed)
from captioners.clip_backbone import ClipBackbone  # noqa: E402
from captioners.judging.scoring import score_groups  # noqa: E402
from captioners.prefix_decoding import beam_candidates, beam_search, decode_tokens, greedy_chooser  # noqa: E402

STOP = 13  # GPT-2's '.'
STEPS = 67  # ClipCap's default caption length limit, as bench_clip_prefix.py
BEAMS = 5

WORDS = (  # 200 common English words: the stand-in detokenizer's vocabulary
    "a", "the", "of", "and", "to", "in", "is", "on", "with", "at", "by", "for", "from", "an", "as", "that", "this",
    "it", "its", "are", "was", "be", "has", "have", "man", "woman", "boy", "girl", "child", "people", "person", "dog",
    "cat", "horse", "bird", "cow", "sheep", "bear", "elephant", "zebra", "giraffe", "car", "bus", "truck", "train",
    "bike", "motorcycle", "boat", "plane", "street", "road", "sidewalk", "building", "house", "city", "park", "field",
    "grass", "tree", "trees", "water", "beach", "ocean", "lake", "river", "snow", "mountain", "sky", "cloud", "sun",
    "light", "night", "table", "chair", "bed", "couch", "room", "kitchen", "bathroom", "window", "door", "wall",
    "floor", "plate", "bowl", "cup", "food", "pizza", "sandwich", "cake", "fruit", "banana", "apple", "orange",
    "bread", "glass", "bottle", "phone", "computer", "laptop", "book", "clock", "sign", "pole", "fence", "bench",
    "umbrella", "bag", "ball", "frisbee", "kite", "skateboard", "surfboard", "skis", "wave", "player", "game", "team",
    "group", "crowd", "couple", "family", "young", "old", "small", "large", "big", "little", "tall", "long", "white",
    "black", "red", "blue", "green", "yellow", "brown", "gray", "pink", "dark", "bright", "open", "empty", "full",
    "wooden", "metal", "sitting", "standing", "walking", "running", "riding", "holding", "playing", "eating",
    "looking", "flying", "lying", "parked", "waiting", "watching", "carrying", "wearing", "jumping", "throwing",
    "catching", "cutting", "smiling", "talking", "next", "near", "top", "front", "back", "side", "middle", "inside",
    "outside", "over", "under", "behind", "down", "up", "together", "two", "three", "several", "many", "some",
    "other", "each", "one", "while", "very", "hat", "shirt", "hand", "face", "head", "toy", "box"
)


def detokenize(tokens: list[int]) -> str:
    """Stand-in for GPT-2's decoder: one word per token, so the text keeps the caption's length."""
    return " ".join(WORDS[t % len(WORDS)] for t in tokens)


def load_clip(device, dtype) -> ClipBackbone:
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None, force_quick_gelu=True)
    model = model.eval().requires_grad_(False).to(device, dtype)
    return ClipBackbone(model, preprocess, open_clip.get_tokenizer("ViT-L-14"), None)


def batches(items, size: int):
    return [items[start:start + size] for start in range(0, len(items), size)]


def best_times(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Run each function once per repeat, alternating; (fastest seconds, all seconds, last result) by name."""
    seconds = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name], s = timed(fn)
            seconds[name].append(s)
    return {name: min(s) for name, s in seconds.items()}, seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stop-scale", type=float, default=32.0,
                        help="scale of the '.' embedding (as bench_clip_prefix.py): 32 gives mixed caption lengths")
    parser.add_argument("--fixed-steps", type=int, default=20,
                        help="tokens per caption in the guidance row without a stop token (0: no such row)")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"device {device} ({dtype}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.images} images, batch {args.batch_size}, repeats {args.repeats} (fastest), beams {BEAMS}, "
          f"load average {os.getloadavg()[0]:.2f} of {os.cpu_count()} CPUs")

    model = full_size_icg_model(STOP, args.stop_scale).to(device, dtype)
    gpt = model.gpt
    clip = load_clip(device, dtype)
    with torch.inference_mode():
        null = model.prefix(torch.zeros(1, 768, device=device, dtype=dtype))
        pixels = [torch.stack([clip.preprocess(i) for i in chunk]).to(device, dtype)
                  for chunk in batches(photos(args.images), args.batch_size)]

    def caption(chunks):
        """(image embeddings, prefixes, greedy tokens) per batch: what captioning computes."""
        out = []
        for chunk in chunks:
            features = clip.encode_images(chunk, normalize=True)
            with torch.inference_mode():
                prefix = model.prefix(features)
            out.append((features, prefix, decode_tokens(gpt, prefix, STOP, STEPS, greedy_chooser())))
        return out

    def score_reused(made):
        return [score_groups(clip, features, [[detokenize(t)] for t in tokens]) for features, _, tokens in made]

    def score_again(made, chunks):
        return [score_groups(clip, clip.encode_images(chunk, normalize=True), [[detokenize(t)] for t in tokens])
                for chunk, (_, _, tokens) in zip(chunks, made)]

    def per_prefix(fn, made):
        out = []
        for _, prefix, _ in made:
            out += fn(prefix)
        return out

    def plain_beam(prefix):
        return beam_search(gpt, prefix, STOP, STEPS, BEAMS)

    def candidates(prefix):
        return beam_candidates(gpt, prefix, STOP, STEPS, beam_size=BEAMS, count=BEAMS)

    def greedy(prefix):
        return decode_tokens(gpt, prefix, STOP, STEPS, greedy_chooser())

    def guided(prefix, guidance=1.0):
        return decode_tokens(gpt, prefix, STOP, STEPS, greedy_chooser(), guidance=guidance, null_prefix=null)

    def greedy_fixed(prefix):  # stop token -1 never comes: every caption is --fixed-steps tokens
        return decode_tokens(gpt, prefix, -1, args.fixed_steps, greedy_chooser())

    def guided_fixed(prefix):
        return decode_tokens(gpt, prefix, -1, args.fixed_steps, greedy_chooser(), guidance=1.0, null_prefix=null)

    # Warm-up: every path once on two images.
    warm = caption([pixels[0][:2]])
    score_reused(warm)
    score_again(warm, [pixels[0][:2]])
    for fn in (plain_beam, candidates, greedy, guided, greedy_fixed, guided_fixed):
        per_prefix(fn, warm)

    caption_s, caption_all, caption_out = best_times({"caption": lambda: caption(pixels)}, args.repeats)
    made = caption_out["caption"]
    score_s, score_all, score_out = best_times(
        {"reused": lambda: score_reused(made), "again": lambda: score_again(made, pixels)}, args.repeats)
    beam_s, beam_all, beam_out = best_times(
        {"beam": lambda: per_prefix(plain_beam, made), "candidates": lambda: per_prefix(candidates, made)},
        args.repeats)
    guide_s, guide_all, guide_out = best_times(
        {"greedy": lambda: per_prefix(greedy, made), "guided": lambda: per_prefix(guided, made)}, args.repeats)
    fixed_s, fixed_all = {}, {}
    if args.fixed_steps > 0:
        fixed_s, fixed_all, _ = best_times({"greedy fixed": lambda: per_prefix(greedy_fixed, made),
                                            "guided fixed": lambda: per_prefix(guided_fixed, made)}, args.repeats)

    tokens = [t for _, _, chunk in made for t in chunk]
    zero = per_prefix(lambda p: guided(p, 0.0), made)
    beams_ok = [group[0] for group in beam_out["candidates"]] == beam_out["beam"]
    zero_ok = zero == tokens == guide_out["greedy"]
    scores = [s for chunk in score_out["reused"] for group in chunk for s in group]
    scores_again = [s for chunk in score_out["again"] for group in chunk for s in group]

    rows = [
        ("CLIPScore, embedding reused / captioning", caption_s["caption"], score_s["reused"], 0.10),
        ("  (reference) CLIPScore, image re-encoded", caption_s["caption"], score_s["again"], None),
        (f"beam_candidates N={BEAMS} / beam_search {BEAMS}", beam_s["beam"], beam_s["candidates"], 1.10),
        ("greedy + guidance 1.0 / greedy", guide_s["greedy"], guide_s["guided"], 1.30),
    ]
    if fixed_s:
        rows.append((f"  same, {args.fixed_steps} tokens each (no stop token)", fixed_s["greedy fixed"],
                     fixed_s["guided fixed"], 1.30))
    print(f"\n{'measure':<44} {'baseline s':>11} {'feature s':>10} {'ratio':>7} {'goal':>7} {'met':>4}")
    for name, base, feature, goal in rows:
        ratio = feature / base
        shown = "-" if goal is None else (f"<{goal:.0%}" if goal < 1 else f"<{goal:.2f}x")
        met = "-" if goal is None else ("yes" if ratio < goal else "no")
        ratio_text = f"{ratio:.1%}" if goal is None or goal < 1 else f"{ratio:.2f}x"
        print(f"{name:<44} {base:>11.2f} {feature:>10.2f} {ratio_text:>7} {shown:>7} {met:>4}")

    lengths = [len(t) for t in tokens]
    guided_lengths = [len(t) for t in guide_out["guided"]]
    beam_lengths = [len(t) for t in beam_out["beam"]]
    print(f"\nchecks: first candidate == beam_search caption: {'ok' if beams_ok else 'MISMATCH'}; "
          f"guidance 0.0 == unguided tokens: {'ok' if zero_ok else 'MISMATCH'}; "
          f"reused and re-encoded scores equal: {'ok' if scores == scores_again else 'MISMATCH'}")
    print(f"caption tokens mean/min/max: greedy {statistics.mean(lengths):.1f}/{min(lengths)}/{max(lengths)}, "
          f"guided {statistics.mean(guided_lengths):.1f}/{min(guided_lengths)}/{max(guided_lengths)}, "
          f"beam {statistics.mean(beam_lengths):.1f}/{min(beam_lengths)}/{max(beam_lengths)}; "
          f"guided/greedy tokens {sum(guided_lengths) / sum(lengths):.2f}x")
    print(f"CLIPScores (random weights) mean {statistics.mean(scores):.3f}; "
          f"load average now {os.getloadavg()[0]:.2f}")
    encoder = encoder_figures("ViT-L-14", lambda p: clip.encode_images(p, normalize=True), pixels[0], args.repeats)
    print(encoder.line())
    env = {**environment(device, dtype), "batch": args.batch_size, "images": args.images, **encoder.columns()}
    append_rows("bench_judging", [
        {**env, "measure": name.strip(), "images_per_s": round(args.images / feature, 4),
         "note": f"baseline {base:.2f} s, feature {feature:.2f} s, ratio {feature / base:.3f}"
                 + ("" if goal is None else f", goal {goal}")}
        for name, base, feature, goal in rows], args.results)
    print("seconds per repeat: " + "; ".join(
        f"{name} {', '.join(f'{s:.2f}' for s in values)}"
        for table in (caption_all, score_all, beam_all, guide_all, fixed_all) for name, values in table.items()))


if __name__ == "__main__":
    main()
