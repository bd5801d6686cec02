"""The local engine: this process's models, images decoded in worker threads (or processes).

An engine turns the images left to caption into outcomes, a batch at a time: ``(position in todo,
JudgedImage or failure reason)``. What happens next (policies, writing, journal, outputs, summary) is
the runner's, the same for every engine. The local engine also times its loop (``times``: waiting for
images, captioning), which the runner completes with its writing time.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, Sequence

import torch

from captioners.base import Captioner
from captioners.batch.discovery import Planned
from captioners.batch.job import BatchJob
from captioners.batch.judged import RunJudgement
from captioners.batch.loading import ImageDataset, collate, iter_batches
from captioners.batch.report import StageTimes
from captioners.batch.sizing import AUTO, auto_batch_size
from captioners.batch.steps import CaptionStep, Pixels, PreprocessStep
from captioners.judging.judge import JudgedImage

Outcome = tuple[int, JudgedImage | str]  # (position in the run's todo list, result or failure reason)
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
        preprocess = PreprocessStep(judge.preprocessor(), first.image_size if job.fast_decode else None)
        dataset = ImageDataset([item.image for item in todo], preprocess)
        pin = first.device is not None and first.device.type == "cuda"
        batch_size = self._batch_size(job, first, step, dataset)
        self.times = times = StageTimes(batch_size=batch_size)
        batches = iter_batches(dataset, batch_size, job.workers, job.loader, pin_memory=pin)
        try:
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                times.waiting_s += time.perf_counter() - started
                if batch is None:
                    break
                outcomes: list[Outcome] = list(batch.failed)
                if batch.pixels is not None:
                    started = time.perf_counter()
                    results = step.caption(batch.pixels)
                    times.captioning_s += time.perf_counter() - started
                    if isinstance(results, str):
                        outcomes += [(index, results) for index in batch.indices]
                    else:
                        outcomes += list(zip(batch.indices, results))
                times.batches += 1
                yield outcomes
        finally:
            batches.close()

    @staticmethod
    def _batch_size(job: BatchJob, captioner: Captioner, step: CaptionStep, dataset: ImageDataset) -> int:
        """``job.batch_size``, or for ``auto`` the largest batch of copies of one of the run's
        images that the model captions without running out of memory (see sizing.py)."""
        if job.batch_size != AUTO:
            return int(job.batch_size)
        @functools.lru_cache(maxsize=1)
        def sample() -> Pixels | None:  # decoded once, and only when a GPU is probed
            candidates = (dataset[i][1] for i in range(min(PROBE_IMAGES, len(dataset))))
            return next((x for x in candidates if not isinstance(x, str)), None)

        def run(size: int) -> None:
            if sample() is not None:  # else the first images do not decode: the run reports them
                with torch.inference_mode():  # the judge itself, not step.caption, which reports errors
                    step.judge.judge(collate([(0, sample())] * size).pixels)

        return auto_batch_size(captioner.device, run, len(dataset))
