"""The Ray engine: the batch engine's two steps on a Ray cluster (``batch --engine ray``).

Ray Data runs the job as ``from_items`` (the images left to caption) -> ``map_batches(preprocess)``
(path -> the model's input, failures as rows; an image in object storage is read there, never on
the driver) -> ``map_batches(CaptionWorker)`` (an actor pool, the models loaded once per actor, on a
GPU when the actor has one) -> this process, which appends every batch of rows to the result table
(``table.py``) and only then hands the rows to the runner, whose writer makes the caption files
exactly as for a local run.

Where the preprocessing runs depends on the workers:
- GPU workers are fed by CPU tasks (``PREPROCESS_CPUS`` each), which decode the next batches while
  the GPU captions;
- CPU workers read their own images (the preprocessing runs inside the actor): a separate task would
  only compete with the actors for the same cores and ship every image through the object store.
  So N CPU workers are N decoders as well as N models, and they may hold every CPU of a node.
  (Measured on 2 CPUs, bench/bench_ray.py: 2 such workers caption at about twice the local engine's
  steady rate; see README "More than one machine".)

Resume: images whose row (made under the same options) is in the table are not captioned again;
their caption files are written from the table. A killed actor is restarted by Ray and its batch
retried (Ray Data's actor pools default to ``max_restarts=-1``, ``max_task_retries=-1``: unbounded, as a
long job needs; tests/test_ray_engine.py kills one); the driver only ever writes the rows it receives,
so each image gets one row per successful captioning.

Ray is optional (the [ray] extra of this package); nothing here imports it until a run starts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from captioners.base import Captioner
from captioners.batch.discovery import Planned
from captioners.batch.job import BatchJob
from captioners.batch.journal import job_key, journal_folder
from captioners.batch.judged import RunJudgement
from captioners.batch.local_engine import Outcome
from captioners.batch.remote import RemoteFile
from captioners.batch.sizing import AUTO
from captioners.batch.steps import CaptionStep, ModelRequest, PreprocessStep, judged_from_row
from captioners.batch.table import ResultTable, arrow_schema
from captioners.errors import CaptionerError
from captioners.judging.judge import Judge, MultiPreprocess

log = logging.getLogger(__name__)

PREPROCESS_CPUS = 1.0  # reserved by each task that preprocesses a batch for GPU workers


@dataclass
class RaySettings:
    address: str | None = None          # None: a local cluster; "auto" or "ray://host:port": an existing one
    workers: int = 1                    # captioning actors
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0; fractions share a GPU
    cpus_per_worker: float = 1.0
    table_dir: str | None = None        # None: a hidden folder named after the job, beside the run journal
    table_format: str = "parquet"
    progress: bool = True               # Ray Data's progress bars
    init_args: dict[str, Any] = field(default_factory=dict)  # extra ray.init arguments (tests: num_cpus)


def table_folder(settings: RaySettings, job: BatchJob, model_id: str, options: dict[str, Any]) -> Path:
    if settings.table_dir:
        return Path(settings.table_dir).expanduser()
    return journal_folder(job) / f".captioners-table-{job_key(job, model_id, options)}"


class RayEngine:
    name = "ray"

    def __init__(self, settings: RaySettings, request: ModelRequest):
        self.settings, self.request = settings, request.absolute()

    def caption(self, todo: Sequence[Planned], captioners: Sequence[Captioner], job: BatchJob,
                judgement: RunJudgement, model_id: str, key: str) -> Iterator[list[Outcome]]:
        if job.batch_size == AUTO:  # its workers may hold other GPUs than this process sees
            raise CaptionerError("batch_size auto (--batch-size auto) is for the local engine; give the Ray "
                                 "engine a number, e.g. the one a local run on a worker's GPU chose.")
        options = captioners[0].decoding_options(job.decoding).to_dict()
        table = None if job.dry_run else ResultTable(table_folder(self.settings, job, model_id, options),
                                                     self.settings.table_format)
        done = table.rows(key) if table is not None else {}
        position = {item.id: i for i, item in enumerate(todo)}
        finished = [(position[item.id], judged_from_row(done[item.id])) for item in todo
                    if item.id in done and not done[item.id].get("error")]
        for start in range(0, len(finished), job.batch_size):  # captioned by an earlier run: written from the table
            yield finished[start:start + job.batch_size]
        taken = {i for i, _ in finished}
        rest = [item for i, item in enumerate(todo) if i not in taken]
        if not rest:
            return
        if table is not None:
            table.prepare()
        ray = _import_ray()
        started = _connect(ray, self.settings)
        try:
            gpus = self._gpus_per_worker(ray)
            self._check_room(ray, fixed_size=started, gpus_per_worker=gpus)
            for rows in self._rows(ray, rest, captioners, job, model_id, key, gpus):
                if table is not None:
                    table.append(rows)  # first the table: a run killed after this resumes from it
                yield [(position[row["id"]], judged_from_row(row)) for row in rows]
        finally:
            if started:
                ray.shutdown()

    def _rows(self, ray: Any, items: list[Planned], captioners: Sequence[Captioner], job: BatchJob,
              model_id: str, key: str, gpus: float) -> Iterator[list[dict[str, Any]]]:
        preprocess, slots = driver_preprocessing(captioners, job)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = self.settings.progress
        records, filesystems = source_records(items)
        blocks = max(1, min(len(records), math.ceil(len(records) / job.batch_size)))
        dataset = ray.data.from_items(records, override_num_blocks=blocks)
        reading: dict[str, Any] | None = {"step": preprocess, "filesystems": filesystems}
        if gpus > 0:  # CPU tasks feed the GPU actors (see the module docstring); CPU actors read their own
            dataset = dataset.map_batches(preprocess_batch, fn_kwargs={**reading, "slots": slots},
                                          batch_size=job.batch_size, batch_format="pyarrow", num_cpus=PREPROCESS_CPUS)
            reading = None
        dataset = dataset.map_batches(
            CaptionWorker, fn_constructor_kwargs={"request": self._worker_request(gpus), "job": job,
                                                  "model_id": model_id, "key": key, "slots": slots,
                                                  "reading": reading},
            batch_size=job.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, self.settings.workers)),
            num_gpus=gpus, num_cpus=self.settings.cpus_per_worker)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch.to_pylist()

    def _check_room(self, ray: Any, fixed_size: bool, gpus_per_worker: float) -> None:
        """Actors hold their CPUs for the whole job. CPU workers read their own images, so they may
        take every CPU, but no more; GPU workers must leave one for the preprocessing tasks, or none
        could ever run and the job would wait forever."""
        cpus = ray.cluster_resources().get("CPU", 0)
        reserved = max(1, self.settings.workers) * self.settings.cpus_per_worker
        feeding = PREPROCESS_CPUS if gpus_per_worker > 0 else 0.0
        if reserved + feeding <= cpus:
            return
        room = "no CPU for reading images" if gpus_per_worker > 0 else "more CPUs than it has"
        message = (f"{self.settings.workers} captioning worker(s) x {self.settings.cpus_per_worker:g} CPU need "
                   f"{room} of the cluster's {cpus:g}; use fewer --workers or a smaller --cpus-per-worker")
        if fixed_size:  # the local cluster this run started cannot grow
            raise CaptionerError(message + ".")
        log.warning("%s, unless the cluster adds nodes.", message)

    def _gpus_per_worker(self, ray: Any) -> float:
        if self.settings.gpus_per_worker is not None:
            return float(self.settings.gpus_per_worker)
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _worker_request(self, gpus: float) -> ModelRequest:
        """A worker without a GPU share must not reach for one the WebUI or another actor holds."""
        if gpus == 0 and self.request.device == "auto":
            return ModelRequest(self.request.models, self.request.models_dir, self.request.overrides, "cpu",
                                self.request.dtype)
        return self.request


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise CaptionerError("The Ray engine needs Ray Data: pip install 'ray[data]' (or this package with the "
                             "[ray] extra), then rerun; or use --engine local.") from exc
    return ray


def _connect(ray: Any, settings: RaySettings) -> bool:
    """Join the cluster (or start a local one); True when this run started it and so stops it."""
    if ray.is_initialized():
        return False
    try:
        # Workers' log lines go to this console too, unless the summary is all it should print (--json, --quiet).
        ray.init(address=settings.address or None, include_dashboard=False, log_to_driver=settings.progress,
                 **settings.init_args)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CaptionerError(f"Cannot reach the Ray cluster at {settings.address}: {exc}. Start one with "
                             "'ray start --head', or leave out --ray-address for a local one.") from exc
    return True


def driver_preprocessing(captioners: Sequence[Captioner], job: BatchJob) -> tuple[PreprocessStep, int]:
    """The preprocessing the CPU tasks (or CPU workers) run, taken from the models loaded here on the
    CPU once (which also checks their files before the cluster starts working), and how many tensors
    it makes."""
    for captioner in captioners:
        if not captioner.loaded:
            captioner.load("cpu", torch.float32)
    judge = Judge(captioners, job.decoding, job.judging).load(torch.device("cpu"), torch.float32)
    function = judge.preprocessor()
    slots = len(function.functions) if isinstance(function, MultiPreprocess) else 1
    min_side = captioners[0].image_size if job.fast_decode else None
    if job.gpu_decode:
        log.warning("--gpu-decode applies to the local engine: the Ray engine's workers decode JPEGs on CPUs.")
    if job.cuda_graphs:
        log.warning("--cuda-graphs applies to the local engine: the Ray engine's workers decode step by step.")
    if not (job.report or job.report_html):  # the report's near-duplicates use the text encoder here
        for captioner in captioners:
            captioner.unload()
    return PreprocessStep(function, min_side), slots


def source_records(items: Sequence[Planned]) -> tuple[list[dict[str, Any]], list[Any]]:
    """The dataset's rows: id, path (absolute: a worker's current folder is not this process's; or
    the URI), and for a remote image its filesystem (an index into the list returned with them, which
    travels to the tasks once) and its path inside it. The bytes are read by the tasks, not here."""
    filesystems: list[Any] = []
    index: dict[int, int] = {}
    records = []
    for item in items:
        if isinstance(item.image, RemoteFile):
            number = index.setdefault(id(item.image.filesystem), len(filesystems))
            if number == len(filesystems):
                filesystems.append(item.image.filesystem)
            records.append({"id": item.id, "path": item.image.uri, "filesystem": number,
                            "object": item.image.path})
        else:
            records.append({"id": item.id, "path": str(item.image.absolute()), "filesystem": -1, "object": ""})
    return records, filesystems


def read_batch(batch: Any, step: PreprocessStep, filesystems: Sequence[Any] = ()) -> tuple[list, list, list]:
    """A batch's ids and paths, and each image's preprocessing: the model's input (a tensor, or a
    tuple of them), or the reason it failed (a string)."""
    columns = [batch.column(name).to_pylist() for name in ("id", "path", "filesystem", "object")]
    ids, paths, results = [], [], []
    for image_id, path, number, inside in zip(*columns):
        source = RemoteFile(path, inside, "", filesystems[number]) if number >= 0 else path
        ids.append(image_id)
        paths.append(path)
        results.append(step(source))
    return ids, paths, results


def preprocess_batch(batch: Any, step: PreprocessStep, slots: int, filesystems: Sequence[Any] = ()) -> Any:
    """A CPU task: rows of id, path -> the same with the model's input as float32 bytes, or an error."""
    import pyarrow as pa

    ids, paths, results = read_batch(batch, step, filesystems)
    out: dict[str, list[Any]] = {"id": ids, "path": paths,
                                 "error": [result if isinstance(result, str) else None for result in results]}
    for k in range(slots):
        tensors = [None if isinstance(result, str) else _parts(result)[k].to(torch.float32).contiguous()
                   for result in results]
        out[f"pixels_{k}"] = [None if tensor is None else tensor.numpy().tobytes() for tensor in tensors]
        out[f"shape_{k}"] = [None if tensor is None else list(tensor.shape) for tensor in tensors]
    return pa.table(out)


def _parts(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


class CaptionWorker:
    """A Ray actor: loads the job's models once, then captions batches into table rows."""

    def __init__(self, request: ModelRequest, job: BatchJob, model_id: str, key: str, slots: int,
                 reading: dict[str, Any] | None = None):
        """``reading``: ``read_batch``'s step and filesystems when this actor reads its own images
        (CPU workers), None when CPU tasks hand it the model's inputs."""
        captioners = [captioner.load(request.device, request.dtype) for captioner in request.captioners()]
        judgement = RunJudgement(captioners, job, swap_models=len(captioners) > 1)
        self.step = CaptionStep(judgement.start(), model_id, key)
        self.slots = slots
        self.reading = reading

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        if self.reading is not None:  # the tensors straight from the preprocessing, no bytes between
            ids, paths, results = read_batch(batch, **self.reading)
        else:
            rows = batch.to_pylist()
            ids, paths = [row["id"] for row in rows], [row["path"] for row in rows]
            results = [row["error"] or tuple(_tensor(row[f"pixels_{k}"], row[f"shape_{k}"]) for k in range(self.slots))
                       for row in rows]
        errors = [result if isinstance(result, str) else None for result in results]
        good = [_parts(result) for result in results if not isinstance(result, str)]
        pixels = None
        if good:
            stacked = [torch.stack([parts[k].to(torch.float32) for parts in good]) for k in range(self.slots)]
            pixels = stacked[0] if self.slots == 1 else tuple(stacked)
        table_rows = self.step.rows(ids, paths, pixels, errors)
        return pa.Table.from_pylist(table_rows, schema=arrow_schema())


def _tensor(data: bytes, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
