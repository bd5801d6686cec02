"""One captioning service behind the WebUI tab, the img2img button, the API and the standalone app.

It keeps at most one captioner loaded and runs every job through a :class:`Host`, which is where
the WebUI and the standalone app differ: the WebUI takes its queue lock (captioning never overlaps
a generation), frees the SD model's VRAM, and shows progress in ``shared.state``; the standalone
app only takes a plain lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from captioners.base import Captioner, ModelSpec
from captioners.devices import free_memory, resolve_device
from captioners.errors import CaptionerError, ImageLoadError, MissingWeightsError, TooLargeError
from captioners.images import OPEN_ERRORS, EncodedImage, open_failure
from captioners.options import DecodingOptions
from captioners.regions import RegionOptions

if TYPE_CHECKING:  # the registry imports transformers: loaded at first use, not with the WebUI
    from captioners.registry import ModelRow

log = logging.getLogger(__name__)

AFTER_USE = ("keep", "offload", "unload")  # keep on its device | move to CPU RAM | free it


class InputNotFoundError(CaptionerError):
    """A folder or file named in a job does not exist."""


# Images sent to the API: pixels per image and per request. A decoded pixel costs 3-4 bytes, several
# times over while it is converted, so these keep one request within a few GB of RAM.
MAX_IMAGE_MPIXELS = 64
MAX_REQUEST_MPIXELS = 256


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    model: str
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"             # auto (fp16 on CUDA) | fp16 | bf16 | fp32
    after_use: str = "keep"         # one of AFTER_USE
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    max_image_mpixels: float = MAX_IMAGE_MPIXELS      # encoded images (the API): per image
    max_request_mpixels: float = MAX_REQUEST_MPIXELS  # and all images of one request together
    score_clip: str | None = None   # CLIP scoring captions of models without their own (None: ViT-L-14:openai)
    after_batch: str | None = None  # after a batch (one of AFTER_USE); None: as after_use
    idle_unload_s: float = 0.0      # a kept or offloaded model is unloaded after this long unused (0: never)
    region: RegionOptions = field(default_factory=RegionOptions)  # captioning a masked area: the crop


class Host:
    """The standalone host: a plain lock, no VRAM sharing. The WebUI adapter subclasses it."""

    def __init__(self, settings: Callable[[], Settings]):
        self._settings = settings
        self._lock = threading.Lock()

    def settings(self) -> Settings:
        return self._settings()

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

    def dtype(self, name: str, device: torch.device) -> str:
        return name

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No other job runs meanwhile (the WebUI: no generation either)."""
        with self._lock:
            yield

    @contextlib.contextmanager
    def job(self, name: str, device: torch.device) -> Iterator[None]:
        """Run one captioning job exclusively; the WebUI version also shares the GPU with the SD model."""
        with self.exclusive():
            yield

    @contextlib.contextmanager
    def current_job(self, name: str, device: torch.device) -> Iterator[None]:
        """Run inside a job the host is already running (a WebUI generation calling the service from
        a script or a callback). The WebUI host must not wait for its queue again there; the standalone
        host has no such jobs, so it runs a job as usual."""
        with self.job(name, device):
            yield

    def report(self, done: int, total: int, text: str) -> None:
        """Progress of the running job, for the host's own progress display."""

    def stop_requested(self) -> bool:
        """Whether the host asked every job to stop (the WebUI's Interrupt button)."""
        return False


class CaptionService:
    def __init__(self, host: Host):
        self.host = host
        self._captioner: Captioner | None = None
        self._state_lock = threading.RLock()  # guards _captioner and _stops
        self._stops: set[threading.Event] = set()
        self._scorer: Any = None  # the last scoring CLIP (captioners.judging.scoring.ScoringClip), kept loaded
        # Unloading an idle model: the timer armed after the last job, and when that job ended.
        self._idle_timer: threading.Timer | None = None
        self._last_used = time.monotonic()

    # ---- models ---------------------------------------------------------------------------------
    def settings(self) -> Settings:
        return self.host.settings()

    def model_specs(self) -> dict[str, ModelSpec]:
        from captioners.registry import available_models

        return available_models(self.settings().models_dir)

    def model_rows(self) -> list[ModelRow]:
        from captioners.registry import model_rows

        return model_rows(self.settings().models_dir, self.model_specs().values(), self.loaded_model())

    def loaded_model(self) -> str | None:
        with self._state_lock:
            captioner = self._captioner
            return captioner.spec.id if captioner is not None and captioner.loaded else None

    def spec(self, model: str | None = None) -> ModelSpec:
        from captioners.registry import get_spec

        settings = self.settings()
        return get_spec(model or settings.model, settings.models_dir)

    def download(self, model: str | None = None) -> Iterator[str]:
        """Fetch a model's missing files, yielding a line per file (for a progress display)."""
        from captioners.registry import FAMILIES
        from captioners.weights import ensure_assets

        spec = self.spec(model)
        models_dir = self.settings().models_dir
        assets = FAMILIES[spec.family].assets(spec)
        for number, asset in enumerate(assets, 1):
            where = asset.path(models_dir)
            if asset.is_present(models_dir):
                yield f"{number}/{len(assets)} present: {where}"
                continue
            yield f"{number}/{len(assets)} downloading {asset.source()} -> {where}"
            with _for_ui():
                ensure_assets([asset], models_dir, model=spec.id)
            yield f"{number}/{len(assets)} done: {where}"

    # ---- captioning -----------------------------------------------------------------------------
    def caption(self, images: Sequence[Image.Image | EncodedImage], model: str | None = None,
                options: DecodingOptions | Mapping[str, Any] | None = None, *,
                in_current_job: bool = False) -> tuple[str, list[str]]:
        """Caption PIL or encoded images with ``model`` (default: the Settings' model); returns
        (model id, captions). Encoded images are size-checked here and decoded inside the job.

        ``in_current_job``: the caller runs inside a host job already (a WebUI generation): no job of
        its own then (see :meth:`Host.current_job`), and no progress report, which is the generation's.
        """
        if not images:
            raise CaptionerError("No image given.")
        settings = self.settings()
        check_pixel_limits(images, settings)
        check_decoded(images)
        spec = self.spec(model)
        decoding = _as_options(options).merged(settings.decoding)
        device = self.host.device(settings.device)
        job = self.host.current_job if in_current_job else self.host.job
        report = _no_report if in_current_job else self.host.report
        with _for_ui(), job("captioners", device):
            with self._use(spec, settings, device) as captioner:
                report(0, len(images), f"Captioning {len(images)} image(s) with {spec.id}")
                captions = captioner.caption(list(images), decoding)
                report(len(images), len(images), "")
        return spec.id, captions

    def judge(self, images: Sequence[Image.Image | EncodedImage], model: str | Sequence[str] | None = None,
              options: DecodingOptions | Mapping[str, Any] | None = None, judging: Any = None
              ) -> tuple[list[str], list[Any]]:
        """Judged captions (scores, several per image, best-of-N, gates: see captioners.judging) of PIL or
        encoded images; returns (model ids, one JudgedImage per image). Several models: the first is
        kept as Settings say, the others are loaded for this call and freed after it."""
        from captioners.batch.shaping import clip_token_counter
        from captioners.judging.judge import Judge
        from captioners.judging.options import JudgingOptions

        if not images:
            raise CaptionerError("No image given.")
        settings = self.settings()
        check_pixel_limits(images, settings)
        check_decoded(images)
        judging = _with_default_score_clip(
            judging if isinstance(judging, JudgingOptions) else JudgingOptions.from_mapping(judging), settings)
        specs = [self.spec(m) for m in _model_list(model)]
        decoding = _as_options(options).merged(settings.decoding)
        device = self.host.device(settings.device)
        with _for_ui(), self.host.job("captioners", device):
            with self._use_many(specs, settings, device) as captioners:
                counter = clip_token_counter() if judging.max_tokens else None
                count_t5 = self._t5_counter(judging, settings)
                judge = Judge(captioners, decoding, judging, count_tokens=counter, count_t5_tokens=count_t5,
                              swap_models=len(captioners) > 1 and settings.after_use != "keep",
                              scorer=self._scorer)
                judge.load(captioners[0].device, captioners[0].dtype)
                self._scorer = judge.scorer or self._scorer
                self.host.report(0, len(images), f"Captioning {len(images)} image(s) with {judge.model_ids[0]}")
                results = judge.judge_images(list(images))
                self.host.report(len(images), len(images), "")
        return judge.model_ids, results

    def _t5_counter(self, judging: Any, settings: Settings) -> Callable[[str], int] | None:
        if not judging.t5_max_tokens:
            return None
        from captioners.judging.budgets import t5_token_counter

        return t5_token_counter(settings.models_dir)

    def run_batch(self, job: Any, model: str | None = None,
                  on_progress: Callable[[Any], None] | None = None,
                  stop: threading.Event | None = None) -> Any:
        """Caption a folder job (a ``captioners.batch.BatchJob`` or its mapping); returns its summary."""
        from captioners.batch import BatchJob, plan_job, run_batch

        if not isinstance(job, BatchJob):
            job = BatchJob.from_mapping(job)
        check_inputs([*job.inputs, *([job.file_list] if getattr(job, "file_list", None) else [])])
        settings = self.settings()
        swap_models = settings.after_use != "keep"  # several models take turns on the device
        if settings.after_batch:  # a dataset job: what comes next (training) wants the memory back
            settings = replace(settings, after_use=settings.after_batch)
        specs = [self.spec(m) for m in _model_list(model)]
        job = _with_default_decoding(job, settings.decoding)
        job = replace(job, judging=_with_default_score_clip(job.judging, settings))
        plan = plan_job(job)  # bad inputs and outputs are refused before the model loads
        device = self.host.device(settings.device)
        stop = stop or threading.Event()
        with self._state_lock:
            self._stops.add(stop)

        def progress(update: Any) -> None:
            rate = f", {update.images_per_s:.2f} images/s" if update.images_per_s else ""
            self.host.report(update.done, update.total, f"Captioning {update.done}/{update.total}{rate}")
            if on_progress is not None:
                on_progress(update)

        try:
            with _for_ui(), self.host.job("captioners batch", device):
                with self._use_many(specs, settings, device) as captioners:
                    return run_batch(captioners, job, on_progress=progress, plan=plan,
                                     should_stop=lambda: stop.is_set() or self.host.stop_requested(),
                                     swap_models=len(captioners) > 1 and swap_models)
        finally:
            with self._state_lock:
                self._stops.discard(stop)

    def interrupt(self) -> bool:
        """Stop every running or queued batch at its next check; whether there was one."""
        with self._state_lock:
            for stop in self._stops:
                stop.set()
            return bool(self._stops)

    def unload(self) -> str | None:
        """Free the loaded model (under the host's lock, so never in the middle of a job)."""
        self._cancel_idle_timer()
        with self.host.exclusive():
            return self._unload_now()

    def _unload_now(self) -> str | None:
        """:meth:`unload` for a caller that holds the host's lock."""
        with self._state_lock:
            captioner, self._captioner = self._captioner, None
        self._release_scorer()
        if captioner is None or not captioner.loaded:
            return None
        captioner.unload()
        log.info("Unloaded %s", captioner.spec.id)
        return captioner.spec.id

    def _release_scorer(self) -> None:
        if self._scorer is not None:
            self._scorer = None
            free_memory()

    # ---- unloading an idle model ----------------------------------------------------------------
    def _arm_idle_timer(self, idle_s: float) -> None:
        """After a job that leaves a model in memory: unload it once ``idle_s`` pass without another job."""
        self._cancel_idle_timer()
        self._last_used = time.monotonic()
        if idle_s <= 0:
            return
        timer = threading.Timer(idle_s, self._unload_if_idle, args=(self._last_used, idle_s))
        timer.daemon = True  # never keeps a stopping WebUI alive
        timer.name = "captioners-idle-unload"
        with self._state_lock:
            self._idle_timer = timer
        timer.start()

    def _cancel_idle_timer(self) -> None:
        with self._state_lock:
            timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()

    def _unload_if_idle(self, armed_at: float, idle_s: float) -> None:
        """The timer's end. It waits for the host's lock (a generation may be running); a job that
        ran meanwhile re-armed the timer, and then this one leaves the model alone."""
        with self.host.exclusive():
            if self._last_used != armed_at:
                return
            log.info("Captioners: no job for %.0f min: unloading the model", idle_s / 60)
            self._unload_now()

    # ---- internals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use(self, spec: ModelSpec, settings: Settings, device: torch.device) -> Iterator[Captioner]:
        """The captioner for ``spec`` on ``device``; afterwards keep, offload or unload it per Settings.

        Any unexpected exception (out of memory included) unloads it: a failed job must not leave VRAM
        held. A CaptionerError (bad input) leaves it as Settings say.
        """
        self._cancel_idle_timer()
        captioner = self._acquire(spec, settings, device)
        try:
            yield captioner
        except CaptionerError:  # a user's mistake (e.g. a damaged image): the model itself is fine
            self._after_use(settings)
            raise
        except BaseException:
            self._drop()
            raise
        self._after_use(settings)

    @contextlib.contextmanager
    def _use_many(self, specs: Sequence[ModelSpec], settings: Settings, device: torch.device
                  ) -> Iterator[list[Captioner]]:
        """The first model as :meth:`_use` keeps it; the others loaded for this job only and freed after
        it (every model's files are checked first, so a missing one is named before any load)."""
        from captioners.registry import FAMILIES, create_captioner
        from captioners.weights import ensure_assets

        if len(specs) > 1:
            ensure_assets([a for spec in specs for a in FAMILIES[spec.family].assets(spec)], settings.models_dir,
                          model=", ".join(spec.id for spec in specs))
        with self._use(specs[0], settings, device) as first:
            extras: list[Captioner] = []
            try:
                for spec in specs[1:]:
                    extras.append(create_captioner(spec, settings.models_dir).load(device,
                                                                                   self.host.dtype(settings.dtype, device)))
                yield [first, *extras]
            finally:
                for extra in extras:
                    extra.unload()

    def _acquire(self, spec: ModelSpec, settings: Settings, device: torch.device) -> Captioner:
        from captioners.registry import create_captioner

        dtype = self.host.dtype(settings.dtype, device)
        with self._state_lock:
            captioner = self._captioner
        if captioner is not None and captioner.spec != spec:
            self._drop()
            captioner = None
        if captioner is None:
            captioner = create_captioner(spec, settings.models_dir)
        if captioner.loaded and captioner.device != device:
            try:
                captioner.to(device)  # back from an offload: much faster than reloading
            except CaptionerError:
                captioner.unload()
        try:
            captioner.load(device, dtype)
        except BaseException:
            with self._state_lock:
                self._captioner = None
            raise
        with self._state_lock:
            self._captioner = captioner
        return captioner

    def _after_use(self, settings: Settings) -> None:
        with self._state_lock:
            captioner = self._captioner
        if captioner is None or not captioner.loaded:
            return
        if settings.after_use == "unload":
            self._drop()
            self._release_scorer()
            return
        if settings.after_use == "offload" and captioner.device.type != "cpu":
            try:
                captioner.to("cpu")
            except CaptionerError:  # a family that cannot move: free it instead
                self._drop()
                return
        self._arm_idle_timer(settings.idle_unload_s)  # kept or offloaded: freed once unused a while

    def _drop(self) -> None:
        with self._state_lock:
            captioner, self._captioner = self._captioner, None
        if captioner is not None:
            captioner.unload()
        free_memory()


LATEST_CAPTIONS = 8  # captions a UI shows of a batch: the latest ones


class BatchHandle:
    """A batch running in a background thread, polled by a UI (which must not block on it)."""

    def __init__(self, service: CaptionService, job: Any, model: str | None = None):
        self.progress: Any = None
        # (image, caption) of the latest captions, oldest first: each progress update brings those of
        # the images done since the one before.
        self.latest: list[tuple[str, str]] = []
        self.summary: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(service, job, model), daemon=True,
                                        name="captioners-batch")
        self._thread.start()

    def _run(self, service: CaptionService, job: Any, model: str | None) -> None:
        try:
            self.summary = service.run_batch(job, model, on_progress=self._on_progress, stop=self.stop)
        except BaseException as exc:  # reported to the UI; never kills the server
            if not isinstance(exc, CaptionerError):
                log.exception("Batch failed")
            self.error = exc
        finally:
            self.done.set()

    def _on_progress(self, progress: Any) -> None:
        self.latest = [*self.latest, *(getattr(progress, "recent", None) or [])][-LATEST_CAPTIONS:]
        self.progress = progress


def _no_report(done: int, total: int, text: str) -> None:
    return None


@contextlib.contextmanager
def _for_ui() -> Iterator[None]:
    """The service serves the tab, the img2img button and the API, never the command line: a missing
    file's message names the tab's fields (Models > Local files), not options like --clip-weights."""
    try:
        yield
    except MissingWeightsError as exc:
        raise exc.for_ui() from None


def check_decoded(images: Sequence[Any]) -> None:
    """Decode PIL images now (a page's upload may be opened lazily from memory): a damaged one is an
    ImageLoadError naming it, not Pillow's "cannot identify image file <_io.BytesIO object at ...>"."""
    pil = [image for image in images if isinstance(image, Image.Image)]
    for number, image in enumerate(pil, 1):
        try:
            image.load()
        except OPEN_ERRORS as exc:
            which = "The image" if len(pil) == 1 else f"Image {number} of {len(pil)}"
            raise ImageLoadError(f"{which} cannot be read: {open_failure(exc)}.") from None


def check_inputs(inputs: Sequence[Any]) -> None:
    """Named folders and files must exist (glob patterns are left to the batch engine)."""
    for item in inputs:
        text = str(item)
        if any(ch in text for ch in "*?["):
            continue
        if not Path(text).expanduser().exists():
            raise InputNotFoundError(f"Input folder or file not found: {text}")


def check_pixel_limits(images: Sequence[Any], settings: Settings) -> None:
    """Refuse encoded images above the per-image or per-request pixel limits, before any decoding."""
    encoded = [image for image in images if isinstance(image, EncodedImage)]
    for image in encoded:
        if image.pixels > settings.max_image_mpixels * 1e6:
            width, height = image.size
            raise TooLargeError(f"{image.where} is {width}x{height} ({_millions(image.pixels)} million pixels); "
                                f"the limit is {settings.max_image_mpixels:g} million per image.")
    total = sum(image.pixels for image in encoded)
    if total > settings.max_request_mpixels * 1e6:
        raise TooLargeError(f"The images of this request have {_millions(total)} million pixels together; the "
                            f"limit is {settings.max_request_mpixels:g} million per request: send fewer at a time.")


def _millions(pixels: int) -> str:
    """Enough digits that a count just above a limit never reads as the limit itself."""
    return f"{pixels / 1e6:.4g}"


def _with_default_score_clip(judging: Any, settings: Settings) -> Any:
    """The Settings' scoring CLIP, for models without their own, when the request names none. The
    models' own CLIP still scores when they have one: only a CLIP named in the request overrides it."""
    if judging.score_clip or not settings.score_clip:
        return judging
    return replace(judging, fallback_score_clip=settings.score_clip)


def _model_list(model: str | Sequence[str] | None) -> list[str | None]:
    """A model id, several (a list, or ids separated by commas), or None for the Settings' model."""
    if model is None:
        return [None]
    items = [model] if isinstance(model, str) else list(model)
    ids = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return ids or [None]


def _as_options(options: DecodingOptions | Mapping[str, Any] | None) -> DecodingOptions:
    return options if isinstance(options, DecodingOptions) else DecodingOptions.from_mapping(options)


def _with_default_decoding(job: Any, defaults: DecodingOptions) -> Any:
    from dataclasses import replace

    decoding = getattr(job, "decoding", None) or DecodingOptions()
    return replace(job, decoding=_as_options(decoding).merged(defaults))
