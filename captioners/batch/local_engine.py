"""The local engine: this process's models, images decoded in worker threads (or processes).

An engine turns the images left to caption into outcomes, a batch at a time: ``(position in todo,
JudgedImage or failure reason)``. What happens next (policies, writing, journal, outputs, summary) is
the runner's, the same for every engine.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from captioners.base import Captioner
from captioners.batch.discovery import Planned
from captioners.batch.job import BatchJob
from captioners.batch.judged import RunJudgement
from captioners.batch.loading import ImageDataset, iter_batches
from captioners.batch.steps import CaptionStep, PreprocessStep
from captioners.judging.judge import JudgedImage

Outcome = tuple[int, JudgedImage | str]  # (position in the run's todo list, result or failure reason)


class LocalEngine:
    name = "local"

    def caption(self, todo: Sequence[Planned], captioners: Sequence[Captioner], job: BatchJob,
                judgement: RunJudgement, model_id: str, key: str) -> Iterator[list[Outcome]]:
        """Outcomes in batches of ``job.batch_size``; close the iterator to stop the workers."""
        for each in captioners:
            if not each.loaded:
                each.load()
        judge = judgement.start()
        first = captioners[0]
        step = CaptionStep(judge, model_id, key)
        preprocess = PreprocessStep(judge.preprocessor(), first.image_size if job.fast_decode else None)
        dataset = ImageDataset([item.image for item in todo], preprocess)
        pin = first.device is not None and first.device.type == "cuda"
        batches = iter_batches(dataset, job.batch_size, job.workers, job.loader, pin_memory=pin)
        try:
            for batch in batches:
                outcomes: list[Outcome] = list(batch.failed)
                if batch.pixels is not None:
                    results = step.caption(batch.pixels)
                    if isinstance(results, str):
                        outcomes += [(index, results) for index in batch.indices]
                    else:
                        outcomes += list(zip(batch.indices, results))
                yield outcomes
        finally:
            batches.close()
