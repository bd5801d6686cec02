"""Where a ViT image encoder's time goes on this machine: the library's forward against ours, in one run.

For each open_clip architecture, or FuseCap's BLIP vision tower (random weights; the shapes are
what matter), and batch size:

- the library's own forward (open_clip's blocks: nn.MultiheadAttention, whose inference fast path
  runs ``_native_multi_head_attention``; transformers' BlipVisionModel: explicit attention scores
  and softmax) against our forward of the same weights (``captioners/vit_encoder.py``, what the
  package runs on a CPU), timed alternately, best of ``--repeats`` each, with the largest difference
  of their outputs (it must stay at fp32 rounding);
- each one's achieved GFLOP/s (the FLOPs it does: ours skips most of the last block's, see
  vit_encoder.py) against a plain matmul of the largest linear layer's shape measured here too;
- at the last batch size, a profile of one call of each, grouped: linear layers (addmm/addmm_/mm),
  attention (its matmuls and softmax, or the fused kernel), everything else (GELU, layer norms,
  residual adds, copies, allocation), and the linear layers' own GFLOP/s against the matmul.

    .venv/bin/python bench/bench_encoder.py --arch ViT-L-14 --batch-size 1 8 16
    .venv/bin/python bench/bench_encoder.py --arch blip-vit-b16-384 --batch-size 1 2 4 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (EncoderFigures, add_results_argument, append_rows, count_flops,  # noqa: E402
                          environment, linear_shapes, matmul_gflops, timed)
from captioners.vit_encoder import OwnBlipVisionForward, OwnViTForward  # noqa: E402

LINEAR_OPS = {"aten::addmm", "aten::addmm_", "aten::mm"}
ATTENTION_OPS = {"aten::bmm", "aten::_softmax", "aten::_transform_bias_rescale_qkv",
                 "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::baddbmm",
                 "aten::_native_multi_head_attention"}


def profile_groups(fn) -> dict[str, float]:
    """Seconds of one ``fn()`` per group of operators (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups = {"linear layers": 0.0, "attention": 0.0, "everything else": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        group = ("linear layers" if event.key in LINEAR_OPS else "attention" if event.key in ATTENTION_OPS
                 else "everything else")
        groups[group] += seconds
    return groups


def linear_flops(fn) -> int:
    """FLOPs (2 per multiply-add) of every linear layer's matmul in one ``fn()``."""
    return sum(2 * m * k * n for m, k, n in linear_shapes(fn))


def alternate_best(forwards: dict, pixels: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """Each forward's output and best time, timed in turns so a shared machine's load hits both."""
    outputs, best = {}, {name: float("inf") for name in forwards}
    for _ in range(max(1, repeats)):
        for name, forward in forwards.items():
            outputs[name], seconds = timed(lambda: forward(pixels))
            best[name] = min(best[name], seconds)
    return outputs, best


BLIP = "blip-vit-b16-384"  # FuseCap's vision tower: transformers' BlipVisionModel, ViT-B/16 at 384 px


def towers(arch: str) -> tuple[dict, int]:
    """{"the library's forward": fn, "our forward": fn} for ``arch``, and its image size."""
    if arch == BLIP:
        from transformers import BlipVisionConfig, BlipVisionModel

        torch.manual_seed(0)
        vision = BlipVisionModel(BlipVisionConfig(image_size=384, patch_size=16)).eval()
        with torch.no_grad():  # as BLIP initialises them (some transformers releases leave them unset)
            for name, parameter in vision.named_parameters():
                norm_scale = "norm" in name and name.endswith("weight")
                parameter.copy_(torch.ones_like(parameter) if norm_scale else torch.randn_like(parameter) * 0.02)
        return {"transformers' forward": lambda pixels: vision(pixel_values=pixels)[0],
                "our forward": OwnBlipVisionForward(vision)}, 384
    import open_clip

    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True).eval()
    return {"open_clip's forward": model.encode_image, "our forward": OwnViTForward(model.visual)}, \
        model.visual.image_size[0]


def bench(arch: str, args) -> list[dict]:
    forwards, size = towers(arch)
    library = next(iter(forwards))
    one = torch.randn(1, 3, size, size)
    flops = {name: count_flops(lambda: forward(one)) for name, forward in forwards.items()}
    m, k, n = max(linear_shapes(lambda: forwards[library](one)), key=lambda s: s[0] * s[1] * s[2])
    env = environment("cpu", torch.float32)
    theirs, ours = (flops[name] / 1e9 for name in forwards)
    print(f"\n{arch}: {theirs:.1f} GFLOP/image in {library}, {ours:.1f} in ours; {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'batch':>5} {'forward':<20} {'img/s':>7} {'speed-up':>9} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} "
          f"{'of matmul':>10} {'max difference':>15}")
    rows, pixels = [], None
    with torch.inference_mode():
        for name, forward in forwards.items():
            forward(one)  # warm-up
        for batch in args.batch_size:
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            outputs, seconds = alternate_best(forwards, pixels, args.repeats)
            shape = (m * batch, k, n)
            matmul = matmul_gflops(shape, pixels.device, pixels.dtype)
            reference = outputs[library]
            for name in forwards:
                figures = EncoderFigures(arch, batch, flops[name] / 1e9, flops[name] * batch / seconds[name] / 1e9,
                                         matmul, shape)
                difference = (outputs[name] - reference).abs().max().item() / reference.abs().max().item()
                speedup = seconds[library] / seconds[name]
                print(f"{batch:>5} {name:<20} {batch / seconds[name]:>7.2f} {speedup:>8.2f}x {figures.gflops:>8.0f} "
                      f"{matmul:>15.0f} {figures.ratio:>10.0%} {difference:>15.1e}")
                rows.append({**env, "batch": batch, "measure": f"{arch}: {name}", "images_per_s":
                             round(batch / seconds[name], 3), **figures.columns(),
                             "note": f"speed-up {speedup:.2f}x over {library}, max difference {difference:.1e}"})
    print(f"profile at batch {pixels.shape[0]}, one call each (self CPU time):")
    for name, forward in forwards.items():
        with torch.inference_mode():
            groups = profile_groups(lambda: forward(pixels))
        total = sum(groups.values())
        rate = linear_flops(lambda: forward(pixels[:1])) * pixels.shape[0] / groups["linear layers"] / 1e9
        shares = ", ".join(f"{group} {s:.2f} s ({s / total:.0%})" for group, s in groups.items())
        print(f"  {name:<20} {shares}; linear layers at {rate:.0f} GFLOP/s = {rate / matmul:.0%} of the matmul")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["ViT-L-14"],
                        help=f"open_clip architectures, or {BLIP} (FuseCap's vision tower)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=2)
    add_results_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for arch in args.arch:
        append_rows("bench_encoder", bench(arch, args), args.results)


if __name__ == "__main__":
    main()
