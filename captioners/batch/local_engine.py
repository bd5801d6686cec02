"""The local engine: this process's models, images decoded in worker threads (or processes).

An engine turns the images left to caption into outcomes, a batch at a time: ``(position in todo,
JudgedImage or failure reason)``. What happens next (policies, writing, journal, outputs, summary) is
the runner's, the same for every engine. The local engine also times its loop (``times``: waiting for
images, captioning), which the runner completes with its writing time.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Iterator, Sequence

import torch

from captioners.base import Captioner
from captioners.batch.discovery import Planned
from captioners.batch.gpu_decode import EncodedJpeg, GpuJpegStage, gpu_decode_device
from captioners.batch.job import BatchJob
from captioners.batch.judged import RunJudgement
from captioners.batch.loading import ImageDataset, collate, iter_batches, with_gpu_jpegs
from captioners.batch.report import StageTimes
from captioners.batch.sizing import AUTO, auto_batch_size
from captioners.batch.steps import CaptionStep, Pixels, PreprocessStep
from captioners.judging.judge import JudgedImage

Outcome = tuple[int, JudgedImage | str]  # (position in the run's todo list, result or failure reason)
log = logging.getLogger(__name__)
PROBE_IMAGES = 8  # images tried for one that decodes, to probe the batch size with


class LocalEngine:
    name = "local"

    def __init__(self) -> None:
        self.times = StageTimes()

    def caption(self, todo: Sequence[Planned], captioners: Sequence[Captioner], job: BatchJob,
                judgement: RunJudgement, model_id: str, key: str) -> Iterator[list[Outcome]]:
        """Outcomes in batches of ``job.batch_size`` (auto: see ``_batch_size``); close the iterator to stop
        the workers."""
        for each in captioners:
            if not each.loaded:
                each.load()
        judge = judgement.start()
        first = captioners[0]
        step = CaptionStep(judge, model_id, key)
        min_side, function = first.image_size if job.fast_decode else None, judge.preprocessor()
        gpu_jpegs = self._gpu_jpeg_stage(job, judge, first.device, PreprocessStep(function, min_side))
        preprocess = PreprocessStep(function, min_side, gpu_jpegs=gpu_jpegs is not None)
        dataset = ImageDataset([item.image for item in todo], preprocess)
        pin = first.device is not None and first.device.type == "cuda"
        graphs_before = [each.cuda_graphs for each in captioners]
        for each in captioners:  # for this run only: the captioners may be the WebUI's, shared
            each.cuda_graphs = self._cuda_graphs(job, each)
        try:
            yield from self._batches(dataset, step, self._batch_size(job, first, step, dataset, gpu_jpegs),
                                     job, pin, gpu_jpegs)
        finally:
            for each, before in zip(captioners, graphs_before):
                each.cuda_graphs = before

    def _batches(self, dataset: ImageDataset, step: CaptionStep, batch_size: int, job: BatchJob, pin: bool,
                 gpu_jpegs: GpuJpegStage | None) -> Iterator[list[Outcome]]:
        self.times = times = StageTimes(batch_size=batch_size)
        batches = iter_batches(dataset, batch_size, job.workers, job.loader, pin_memory=pin)
        try:
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                times.waiting_s += time.perf_counter() - started
                if batch is None:
                    break
                started = time.perf_counter()
                if gpu_jpegs is not None:  # GPU work: counted as captioning
                    batch = with_gpu_jpegs(batch, gpu_jpegs)
                outcomes: list[Outcome] = list(batch.failed)
                if batch.pixels is not None:
                    results = step.caption(batch.pixels)
                    if isinstance(results, str):
                        outcomes += [(index, results) for index in batch.indices]
                    else:
                        outcomes += list(zip(batch.indices, results))
                times.captioning_s += time.perf_counter() - started
                times.batches += 1
                yield outcomes
        finally:
            batches.close()

    @staticmethod
    def _cuda_graphs(job: BatchJob, captioner: Captioner) -> bool:
        if job.cuda_graphs and (captioner.device is None or captioner.device.type != "cuda"):
            log.warning("--cuda-graphs needs a CUDA device; %s decodes on %s as usual.", captioner.spec.id,
                        captioner.device)
            return False
        return job.cuda_graphs

    @staticmethod
    def _gpu_jpeg_stage(job: BatchJob, judge, device: torch.device | None,
                        cpu_step: PreprocessStep) -> GpuJpegStage | None:
        """With ``gpu_decode`` on a CUDA GPU: the stage that decodes the batches' JPEGs there."""
        tensor_preprocess = judge.tensor_preprocessor() if job.gpu_decode else None
        jpeg_device = gpu_decode_device(job.gpu_decode, device, tensor_preprocess)
        return GpuJpegStage(tensor_preprocess, jpeg_device, cpu_step) if jpeg_device is not None else None

    @staticmethod
    def _batch_size(job: BatchJob, captioner: Captioner, step: CaptionStep, dataset: ImageDataset,
                    gpu_jpegs: GpuJpegStage | None = None) -> int:
        """``job.batch_size``, or for ``auto`` the largest batch of copies of one of the run's
        images that the model captions without running out of memory (see sizing.py)."""
        if job.batch_size != AUTO:
            return int(job.batch_size)
        @functools.lru_cache(maxsize=1)
        def sample() -> Pixels | None:  # decoded once, and only when a GPU is probed
            candidates = (dataset[i][1] for i in range(min(PROBE_IMAGES, len(dataset))))
            candidates = (gpu_jpegs.pixels_of([x])[0] if isinstance(x, EncodedJpeg) and gpu_jpegs else x
                          for x in candidates)
            return next((x for x in candidates if not isinstance(x, (str, EncodedJpeg))), None)

        def run(size: int) -> None:
            if sample() is not None:  # else the first images do not decode: the run reports them
                with torch.inference_mode():  # the judge itself, not step.caption, which reports errors
                    step.judge.judge(collate([(0, sample())] * size).pixels)

        return auto_batch_size(captioner.device, run, len(dataset))
