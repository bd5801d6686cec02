"""Device and dtype choice: fp16 on CUDA by default, fp32 on CPU."""

from __future__ import annotations

import torch

from captioners.errors import CaptionerError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CaptionerError(f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionerError("CUDA was asked for but torch sees no CUDA GPU; use --device cpu.")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        dtype = name
    elif name in (None, "", "auto"):
        dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    elif name in _DTYPES:
        dtype = _DTYPES[name]
    else:
        raise CaptionerError(f"Unknown dtype {name!r}: use auto, fp32, fp16 or bf16.")
    if device.type == "cpu" and dtype != torch.float32:
        # Half-precision matmuls on CPU are slow or unsupported; stay exact there.
        return torch.float32
    return dtype


def free_memory(device: torch.device | None = None) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
