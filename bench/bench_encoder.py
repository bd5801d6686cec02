"""Where a CLIP image encoder's time goes on this machine, and one alternative attention, in one run.

For each open_clip architecture (random weights; the shapes are what matter):

- the encoder as loaded (open_clip's blocks: nn.MultiheadAttention, whose inference fast path runs
  ``_native_multi_head_attention``) against the same blocks with attention through
  ``scaled_dot_product_attention`` (one fused QKV linear, SDPA, the output projection), side by side,
  with the largest difference of their embeddings (it must stay at fp32 rounding);
- a profile of one call, grouped: linear layers (addmm/mm), attention's own matmuls and softmax,
  everything else (GELU, layer norms, residual adds, layout copies), and the linear layers' achieved
  GFLOP/s against a plain matmul of the largest linear layer's shape measured here (bench/common.py).

    .venv/bin/python bench/bench_encoder.py --arch ViT-L-14 --batch-size 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import add_results_argument, append_rows, encoder_figures, environment, timed  # noqa: E402

LINEAR_OPS = {"aten::addmm", "aten::mm"}
ATTENTION_OPS = {"aten::bmm", "aten::_softmax", "aten::_transform_bias_rescale_qkv",
                 "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::baddbmm"}


def sdpa_attention(block, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.attention for self-attention, through SDPA (older open_clip
    releases run their blocks sequence first)."""
    attn = block.attn
    batch_first = getattr(attn, "batch_first", False)
    x = q_x if batch_first else q_x.transpose(0, 1)
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width))
    return out if batch_first else out.transpose(0, 1)


def best_time(fn, repeats: int) -> tuple[torch.Tensor, float]:
    result, best = None, float("inf")
    for _ in range(repeats):
        result, seconds = timed(fn)
        best = min(best, seconds)
    return result, best


def profile_groups(fn) -> dict[str, float]:
    """Seconds of one ``fn()`` per group of operators (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups = {"linear layers": 0.0, "attention matmuls and softmax": 0.0, "everything else": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in LINEAR_OPS:
            groups["linear layers"] += seconds
        elif event.key in ATTENTION_OPS:
            groups["attention matmuls and softmax"] += seconds
        else:
            groups["everything else"] += seconds
    return groups


def linear_flops(model, batch: int) -> int:
    """FLOPs of the encoder's linear layers for ``batch`` images (2 per multiply-add): per block the
    attention's input (3 x width outputs) and output projections and the MLP, on every token, and
    the final projection of the class token. (The fast path calls no nn.Linear, so hooks miss them.)"""
    visual = model.visual
    tokens = batch * ((visual.image_size[0] // visual.patch_size[0]) ** 2 + 1)
    total = 0
    for block in visual.transformer.resblocks:
        width = block.attn.embed_dim
        mlp = sum(layer.in_features * layer.out_features for layer in block.mlp.modules()
                  if isinstance(layer, torch.nn.Linear))
        total += 2 * tokens * (4 * width * width + mlp)
    if getattr(visual, "proj", None) is not None:
        total += 2 * batch * visual.proj.numel()
    return total


def bench(arch: str, args) -> None:
    import open_clip

    model = open_clip.create_model(arch, pretrained=None).eval()
    size = model.visual.image_size[0]
    pixels = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    blocks = list(model.visual.transformer.resblocks)
    with torch.inference_mode():
        model.encode_image(pixels[:1])  # warm-up
        loaded, loaded_s = best_time(lambda: model.encode_image(pixels), args.repeats)
        groups = profile_groups(lambda: model.encode_image(pixels))
        linear = linear_flops(model, args.batch_size)
        originals = [block.attention for block in blocks]
        for block in blocks:
            block.attention = types.MethodType(sdpa_attention, block)
        try:
            fused, fused_s = best_time(lambda: model.encode_image(pixels), args.repeats)
        finally:
            for block, original in zip(blocks, originals):
                block.attention = original
        difference = (fused - loaded).abs().max().item() / loaded.abs().max().item()
    figures = encoder_figures(arch, model.encode_image, pixels, repeats=1)
    total = sum(groups.values())
    print(f"\n{arch}, batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"open_clip's blocks (MultiheadAttention fast path) {loaded_s:8.3f} s  1.00x")
    print(f"attention through SDPA                            {fused_s:8.3f} s  {loaded_s / fused_s:.2f}x  "
          f"(largest difference {difference:.1e} of the largest value)")
    print(figures.line())
    for name, seconds in groups.items():
        print(f"  {name:<32} {seconds:7.3f} s  {seconds / total:6.1%}")
    linear_rate = linear / groups["linear layers"] / 1e9
    print(f"  linear layers alone: {linear_rate:.0f} GFLOP/s = {linear_rate / figures.matmul_gflops:.0%} of the matmul; "
          f"the encoder could reach at most {figures.gflops * total / groups['linear layers'] / figures.matmul_gflops:.0%} "
          "of it with every other operator free")
    env = environment("cpu", torch.float32)
    append_rows("bench_encoder", [
        {**env, "batch": args.batch_size, "measure": f"{arch}: open_clip blocks", "images_per_s":
         round(args.batch_size / loaded_s, 3), **figures.columns()},
        {**env, "batch": args.batch_size, "measure": f"{arch}: attention through SDPA", "images_per_s":
         round(args.batch_size / fused_s, 3), **figures.columns(), "note": f"max difference {difference:.1e}"},
    ], args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["ViT-L-14"], help="open_clip architectures")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    add_results_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for arch in args.arch:
        bench(arch, args)


if __name__ == "__main__":
    main()
