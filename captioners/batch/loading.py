"""Decoding and preprocessing images in workers while the model runs on the previous batch.

``ImageDataset`` runs the engines' :class:`~captioners.batch.steps.PreprocessStep` on one image
(``load_image``: upright RGB, alpha on white, first frame, then the model's preprocessing); a failure
becomes its reason instead of an exception, and ``collate``
drops failed images from the batch (kohya / JoyCaption style), passing their reasons on.

Two ways to run it in parallel (``BatchJob.loader``):

- ``threads`` (default): a thread pool. Pillow's decoders and resizers and torch's tensor ops
  release the GIL, so threads overlap with the model. Nothing to start or pickle, and safe inside
  the WebUI (no fork of a large multi-threaded server, no spawn re-import on Windows).
- ``processes``: torch DataLoader worker processes (one torch thread each). For preprocessors that
  hold the GIL; costs a worker start per run and a pickle of every batch.

bench/bench_batch.py measures both: on the 2-core test machine they are equal within its noise.
"""

from __future__ import annotations

import signal
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from captioners.batch.gpu_decode import EncodedJpeg, GpuJpegStage
from captioners.batch.job import Loader
from captioners.batch.remote import RemoteFile
from captioners.batch.steps import Pixels, PreprocessStep

PREFETCH_BATCHES = 2  # batches decoded ahead of the model


@dataclass
class LoadedBatch:
    indices: list[int]                 # dataset positions of the images in ``pixels``
    pixels: Pixels | None              # (B, 3, H, W), or a tuple of them; None when every image failed
    failed: list[tuple[int, str]]      # (dataset position, reason)
    jpegs: list[tuple[int, EncodedJpeg]] = field(default_factory=list)  # left for the GPU (--gpu-decode)

    def pin_memory(self) -> "LoadedBatch":
        """Page-locked pixels copy to the GPU asynchronously (DataLoader calls this too)."""
        if self.pixels is not None:
            self.pixels = _each(self.pixels, torch.Tensor.pin_memory)
        return self


def _each(pixels: Pixels, function) -> Pixels:
    """``function`` of the tensor, or of each model's tensor in a tuple."""
    return tuple(function(part) for part in pixels) if isinstance(pixels, tuple) else function(pixels)


class ImageDataset(torch.utils.data.Dataset):
    """The images of a run, each read and preprocessed by the engines' shared step when asked for."""

    def __init__(self, paths: list[Path | RemoteFile], preprocess: PreprocessStep):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Pixels | str]:
        return index, self.preprocess(self.paths[index])


def collate(items: list[tuple[int, Pixels | EncodedJpeg | str]]) -> LoadedBatch:
    jpegs = [(i, x) for i, x in items if isinstance(x, EncodedJpeg)]
    ok = [(i, x) for i, x in items if not isinstance(x, (str, EncodedJpeg))]
    failed = [(i, x) for i, x in items if isinstance(x, str)]
    pixels: Pixels | None = None
    if ok and isinstance(ok[0][1], tuple):
        pixels = tuple(torch.stack(parts) for parts in zip(*(x for _, x in ok)))
    elif ok:
        pixels = torch.stack([x for _, x in ok])
    return LoadedBatch([i for i, _ in ok], pixels, failed, jpegs)


def with_gpu_jpegs(batch: LoadedBatch, stage: GpuJpegStage) -> LoadedBatch:
    """``batch`` with its JPEGs decoded and preprocessed by ``stage`` and joined after its other
    images, every pixel on the stage's device (the CPU-decoded ones in one copy); JPEGs that cannot
    be used join ``failed``."""
    if not batch.jpegs:
        return batch

    def on_device(pixels: Pixels) -> Pixels:
        return _each(pixels, lambda part: part.to(stage.device, non_blocking=True))

    decoded = stage.pixels_of([jpeg for _, jpeg in batch.jpegs])
    gpu = collate([(index, x if isinstance(x, str) else on_device(x)) for (index, _), x in zip(batch.jpegs, decoded)])
    parts = [on_device(pixels) for pixels in (batch.pixels, gpu.pixels) if pixels is not None]
    if len(parts) == 2 and isinstance(parts[0], tuple):
        pixels: Pixels | None = tuple(torch.cat(pair) for pair in zip(*parts))
    else:
        pixels = torch.cat(parts) if len(parts) == 2 else next(iter(parts), None)
    return LoadedBatch(batch.indices + gpu.indices, pixels, batch.failed + gpu.failed)


def iter_batches(dataset: ImageDataset, batch_size: int, workers: int, loader: Loader,
                 pin_memory: bool = False) -> Iterator[LoadedBatch]:
    """Batches in dataset order. Close the iterator (or exhaust it) to stop the workers."""
    if workers == 0 or len(dataset) <= 1:
        batches = _inline_batches(dataset, batch_size)
    elif loader == Loader.PROCESSES:
        batches = _process_batches(dataset, batch_size, workers, pin_memory)
    else:
        batches = _thread_batches(dataset, batch_size, workers)
    try:
        for batch in batches:
            yield batch.pin_memory() if pin_memory and loader != Loader.PROCESSES else batch
    finally:
        batches.close()


def _inline_batches(dataset: ImageDataset, batch_size: int) -> Iterator[LoadedBatch]:
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _thread_batches(dataset: ImageDataset, batch_size: int, workers: int) -> Iterator[LoadedBatch]:
    total = len(dataset)
    window = batch_size * (PREFETCH_BATCHES + 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="captioners-load")
    pending: deque[Future] = deque()
    submitted = 0
    try:
        for start in range(0, total, batch_size):
            while submitted < min(total, start + window):
                pending.append(pool.submit(dataset.__getitem__, submitted))
                submitted += 1
            yield collate([pending.popleft().result() for _ in range(min(batch_size, total - start))])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # at most ``workers`` images still finish


def _process_batches(dataset: ImageDataset, batch_size: int, workers: int,
                     pin_memory: bool) -> Iterator[LoadedBatch]:
    data = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                       worker_init_fn=_ignore_sigint, prefetch_factor=PREFETCH_BATCHES,
                                       pin_memory=pin_memory)
    iterator = iter(data)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown:
            shutdown()


def _ignore_sigint(_: int) -> None:
    """Ctrl-C reaches the whole process group; only the main process decides how to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
