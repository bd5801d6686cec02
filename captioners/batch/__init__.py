"""Batch captioning of folders for training sets: the engine behind the CLI, the WebUI tab and the API.

    from captioners.batch import BatchJob, run_batch
    summary = run_batch(captioner, BatchJob(inputs=["dataset/"], recursive=True))
"""

from captioners.batch.discovery import Discovery, Planned, plan_images
from captioners.batch.job import BatchJob, ExistingPolicy, Loader, TextShaping, TriggerMode
from captioners.batch.report import BatchSummary, Progress
from captioners.batch.runner import plan_job, run_batch
from captioners.batch.shaping import merge_texts, shape_caption

__all__ = ["BatchJob", "BatchSummary", "Discovery", "ExistingPolicy", "Loader", "Planned", "Progress",
           "TextShaping", "TriggerMode", "merge_texts", "plan_images", "plan_job", "run_batch", "shape_caption"]
