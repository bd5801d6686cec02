"""What the benchmarks share: timing, the photos, the full-size random ICG model."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from captioners.families.clipcap_modules import ClipPrefixLayout, ClipPrefixModel

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def timed(fn):
    """``(fn(), seconds)``, waiting for queued CUDA work on both sides so GPU times are real."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def photos(count: int):
    """``count`` RGB photos from ../shared/data/photos (cycled), or random images where it is absent."""
    from PIL import Image

    files = sorted(PHOTOS.glob("*.jpg"))
    if not files:
        rng = torch.Generator().manual_seed(0)
        return [Image.fromarray((torch.rand(480, 640, 3, generator=rng) * 255).byte().numpy()) for _ in range(count)]
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(count)]


def full_size_icg_model(stop_token: int, stop_scale: float) -> ClipPrefixModel:
    """GPT-2 small + ICG's MLP mapper with random weights (fp32, CPU, eval mode).

    Random GPT-2 weights almost never pick the stop token, so its embedding is scaled by
    ``stop_scale``: captions then end at mixed lengths, as a trained model's do.
    """
    layout = ClipPrefixLayout("mlp", vocab_size=50257, n_embd=768, n_positions=1024, n_layer=12, n_inner=3072,
                              prefix_size=768, prefix_length=10, mlp_hidden=3840)
    torch.manual_seed(0)
    model = ClipPrefixModel(layout)
    with torch.no_grad():
        for p in model.clip_project.parameters():
            p.normal_(0, 0.05)
        model.gpt.transformer.wte.weight[stop_token] *= stop_scale
    return model.eval()
