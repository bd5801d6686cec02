"""What the benchmarks share: timing, the photos, the full-size random ICG model, the image
encoder's GFLOP/s against a matmul of its shapes, and result rows appended to bench/results/*.csv."""

from __future__ import annotations

import contextlib
import csv
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

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


# ---- the image encoder's achieved rate, against a plain matmul of its own shapes --------------------
@dataclass
class EncoderFigures:
    """What the image encoder achieved in this run, and what a bare matmul of its largest linear
    layer's shape (same device, dtype) achieved here too: their ratio says how far the encoder is
    from the machine's own matmul speed, on any machine."""

    name: str
    batch: int
    gflop_per_image: float
    gflops: float                      # achieved: FLOPs of one encoder call / its best time
    matmul_gflops: float               # a (m, k) @ (k, n) matmul of the encoder's largest linear layer
    matmul_shape: tuple[int, int, int]

    @property
    def ratio(self) -> float:
        return self.gflops / self.matmul_gflops if self.matmul_gflops else float("nan")

    def line(self) -> str:
        m, k, n = self.matmul_shape
        return (f"image encoder {self.name}: {self.gflop_per_image:.3g} GFLOP/image, {self.gflops:.3g} GFLOP/s "
                f"at batch {self.batch}; matmul {m}x{k}x{n} {self.matmul_gflops:.3g} GFLOP/s; "
                f"encoder / matmul {self.ratio:.0%}")

    def columns(self) -> dict[str, object]:
        return {"encoder": self.name, "encoder_gflop_per_image": round(self.gflop_per_image, 3),
                "encoder_gflops": round(self.gflops, 2), "matmul_gflops": round(self.matmul_gflops, 2),
                "encoder_vs_matmul": round(self.ratio, 4)}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as torch's FlopCounterMode counts them (2 per multiply-add of matmuls,
    convolutions and attention; norms and activations are not counted, as is the convention).
    MultiheadAttention's fused fast path is switched off while counting: the counter cannot see
    inside it, and the unfused path does the same arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode, mm_flop, sdpa_flop_count

    def attention(query, key, value, *_, out_shape=None, **__) -> int:
        return sdpa_flop_count(query, key, value)

    def accumulating_matmul(_self, a, b, *_, out_shape=None, **__) -> int:
        return mm_flop(a, b)  # x.addmm_(a, b): our ViT forward's residual adds

    # Under inference mode the counter sees scaled_dot_product_attention itself, and on a CPU its
    # kernel, neither of which torch's table lists (it has the CUDA kernels only), nor the in-place
    # addmm_: add them.
    aten = torch.ops.aten
    extra_ops = {aten.scaled_dot_product_attention: attention, aten.addmm_: accumulating_matmul}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra_ops[aten._scaled_dot_product_flash_attention_for_cpu] = attention
    with unfused_attention(), FlopCounterMode(display=False, custom_mapping=extra_ops) as counter, \
            torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """MultiheadAttention's fused inference fast path off (operator counters cannot see inside it;
    the unfused path does the same arithmetic), then back as it was."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def largest_linear(fn: Callable[[], object]) -> tuple[int, int, int]:
    """``(m, k, n)`` of the linear layer in ``fn()`` with the most multiply-adds."""
    return max(linear_shapes(fn), key=lambda s: s[0] * s[1] * s[2])


def linear_shapes(fn: Callable[[], object]) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of every linear layer's matmul in ``fn()``, whether called as nn.Linear
    (open_clip's blocks, with :func:`unfused_attention`) or as
    addmm/addmm_ (our own ViT forward). Attention's batched matmuls are not linear layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    matmuls = {aten.addmm.default: 1, aten.addmm_.default: 1, aten.addmm.out: 1, aten.mm.default: 0}
    shapes: list[tuple[int, int, int]] = []

    class RecordMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten.linear.default:  # input (..., k), weight (n, k)
                (n, k) = args[1].shape
                shapes.append((args[0].numel() // k, k, n))
            elif func is aten.matmul.default and args[1].dim() == 2:  # (..., k) @ (k, n): a projection
                (k, n) = args[1].shape
                shapes.append((args[0].numel() // k, k, n))
            elif func in matmuls:  # (m, k) @ (k, n)
                first = matmuls[func]
                (m, k), (_, n) = args[first].shape, args[first + 1].shape
                shapes.append((m, k, n))
            return func(*args, **(kwargs or {}))

    with unfused_attention(), torch.inference_mode(), RecordMatmuls():
        fn()
    if not shapes:
        raise ValueError("the image encoder ran no linear layer: no matmul shape to compare with")
    return shapes


def matmul_gflops(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                  min_seconds: float = 0.2) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` repeated for at least ``min_seconds`` (after one warm-up)."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    with torch.inference_mode():
        a @ b
        calls, seconds = 0, 0.0
        while seconds < min_seconds:
            _, s = timed(lambda: a @ b)
            calls, seconds = calls + 1, seconds + s
    return 2 * m * k * n * calls / seconds / 1e9


def encoder_figures(name: str, encode: Callable[[torch.Tensor], object], pixels: torch.Tensor,
                    repeats: int = 2, matmul: float | None = None) -> EncoderFigures:
    """Time the best of ``repeats`` calls of ``encode(pixels)``, and a matmul of the encoder's
    largest linear layer's shape at this batch on the same device and dtype, in this run (or take
    ``matmul``, GFLOP/s already measured for that shape in this run).

    FLOPs and shapes are taken on one image and scaled by the batch (an image encoder's work is
    linear in it): counting a full batch of a ViT-L on a CPU would cost minutes."""
    batch = int(pixels.shape[0])
    one = pixels[:1]
    flops = count_flops(lambda: encode(one)) * batch
    rows, k, n = largest_linear(lambda: encode(one))
    shape = (rows * batch, k, n)
    with torch.inference_mode():
        seconds = min(timed(lambda: encode(pixels))[1] for _ in range(max(1, repeats)))
    if matmul is None:
        matmul = matmul_gflops(shape, pixels.device, pixels.dtype)
    return EncoderFigures(name, batch, flops / batch / 1e9, flops / seconds / 1e9, matmul, shape)


def captioner_encoder(captioner) -> Callable[[torch.Tensor], object]:
    """A loaded captioner's image encoder, pixels in (moved to its device and dtype) -> embeddings."""
    if getattr(captioner, "clip", None) is not None:  # CLIP-prefix, SBG: a ClipBackbone
        return lambda pixels: captioner.clip.encode_images(pixels, True)
    return lambda pixels: captioner.encode_images(pixels.to(captioner.device, captioner.dtype))  # FuseCap


# ---- results as data: rows appended to bench/results/<bench>.csv ------------------------------------
RESULTS = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = ("date", "bench", "machine", "torch", "transformers", "device", "dtype", "batch", "images",
               "measure", "images_per_s", "data_wait", "encoder", "encoder_gflop_per_image", "encoder_gflops",
               "matmul_gflops", "encoder_vs_matmul", "note")


def environment(device: torch.device | str, dtype: torch.dtype | str) -> dict[str, str]:
    """The columns that say where a row was measured."""
    import platform

    import transformers

    device = torch.device(device)
    shown = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        shown = f"{device} {torch.cuda.get_device_name(device)}"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": f"{_cpu_name() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                       f"{torch.get_num_threads()}",
            "torch": torch.__version__, "transformers": transformers.__version__, "device": shown,
            "dtype": str(dtype).removeprefix("torch.")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def append_rows(bench: str, rows: list[dict[str, object]], folder: Path | str | None = RESULTS) -> Path | None:
    """Append ``rows`` (any of CSV_COLUMNS; the rest left empty) to ``folder/<bench>.csv``, writing
    the header when the file is new. ``folder`` None: nothing written (``--results ''``)."""
    if folder is None or str(folder) == "":
        return None
    path = Path(folder) / f"{bench}.csv"
    unknown = sorted({key for row in rows for key in row} - set(CSV_COLUMNS))
    if unknown:
        raise ValueError(f"not result columns: {', '.join(unknown)} (known: {', '.join(CSV_COLUMNS)})")
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_COLUMNS:
            raise SystemExit(f"{path} has other columns than this benchmark writes; move it away and rerun.")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows({"bench": bench, **row} for row in rows)
    return path


def add_results_argument(parser) -> None:
    parser.add_argument("--results", default=str(RESULTS),
                        help="append this run's rows to DIR/<benchmark>.csv (default bench/results; '' for none)")
