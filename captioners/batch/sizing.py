"""Sizes chosen for the machine: the batch that fits (``batch_size: auto``) and the loader workers.

On a CUDA GPU the batch is found by trying it: a batch of copies of one of the run's images is
captioned at the largest size worth trying, halved after each out-of-memory error, so the size kept
has run the model's real peak (image encoder and decoder, this job's options) once. On a CPU a
bigger batch only costs memory once it is past a few images (bench_batch.py --components: the image
encoder runs no faster batched, the decoder's gain flattens out), so ``CPU_AUTO_BATCH`` is used.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from captioners.devices import free_memory
from captioners.errors import CaptionerError

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_AUTO_BATCH = 8     # the default batch: the figures in README "Speed" were measured with 8 to 32
GPU_LARGEST_BATCH = 256  # largest batch tried on a GPU (the gains flatten long before on every family)
MOST_WORKERS = 8       # decoding threads past this stay idle behind one model


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def probe_batch_size(run: Callable[[int], object], largest: int, device: torch.device | None = None) -> int:
    """The largest of ``largest``, ``largest // 2``, ... 1 for which ``run(size)`` raised no
    out-of-memory error; other errors are raised as they are."""
    size = max(1, largest)
    while True:
        try:
            run(size)
            return size
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if size == 1:
                raise CaptionerError("Even a batch of one image does not fit in the GPU's memory: free the GPU "
                                     "(close other programs), use --dtype fp16 or --device cpu.") from exc
            log.info("Batch size %d does not fit in memory; trying %d", size, size // 2)
        size //= 2
        free_memory(device)


def auto_batch_size(device: torch.device, run: Callable[[int], object], images: int) -> int:
    """The batch size for ``batch_size: auto`` (see the module docstring); ``images``: how many the
    run has (a bigger batch than that is never needed)."""
    if device.type != "cuda":
        return max(1, min(CPU_AUTO_BATCH, images))
    size = probe_batch_size(run, min(GPU_LARGEST_BATCH, max(1, images)), device)
    log.info("Batch size auto: %d images fit on %s", size, device)
    return size


def auto_workers() -> int:
    """Decoding workers for this machine: one CPU is left to the process that drives the model."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MOST_WORKERS, cpus - 1))
