"""The captioner base class: load onto a device, caption a batch, unload.

A model family subclasses :class:`Captioner` and fills in four hooks: ``_load``, ``_release``,
``preprocess`` and ``caption_pixels``. Everything else (device/dtype choice, option defaults,
batching PIL images, freeing memory) lives here once.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from PIL import Image

from captioners.devices import free_memory, resolve_device, resolve_dtype
from captioners.errors import CaptionerError
from captioners.images import EncodedImage, to_rgb
from captioners.options import DecodingOptions
from captioners.tensor_preprocess import TensorPreprocess, from_transforms
from captioners.weights import Asset, ensure_assets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model id and everything needed to build it: family, family config, default decoding."""

    id: str
    family: str
    config: Any  # the family's own frozen dataclass
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    description: str = ""
    origin: str = "built-in"  # built-in | presets file | local file

    def with_config(self, **changes: Any) -> "ModelSpec":
        return replace(self, config=replace(self.config, **changes))


DEFAULT_POOL = 5  # candidates made per image for best-of-N when --num-candidates is not given


@dataclass
class Candidates:
    """What a model proposes for a batch of images: per image, its candidates, best first by the
    model's own ranking (beam score, sample order, SBG's CLIP re-rank).

    ``image_features`` are the images' L2-normalised embeddings from the model's own CLIP, when the
    family has one (``clip``): CLIPScore then reuses them instead of encoding the images again.
    """

    texts: list[list[str]]
    image_features: torch.Tensor | None = None
    clip: Any = None  # the ClipBackbone of image_features


def candidate_request(options: DecodingOptions) -> tuple[int, str]:
    """How many candidates to make per image, and how (beam | sample), for these merged options.

    One caption chosen by the model itself is today's plain decoding (count 1). Otherwise the pool
    is ``num_candidates`` (default 5), never fewer than the captions kept per image; candidates
    come from beam search unless the strategy samples or ``candidates`` says otherwise.
    """
    keep = options.captions_per_image or 1
    if keep == 1 and options.select != "clip":
        return 1, options.strategy or "greedy"
    mode = options.candidates or ("sample" if options.strategy == "sample" else "beam")
    return max(keep, options.num_candidates or DEFAULT_POOL), mode


class Captioner(ABC):
    """Base class of every model family."""

    family: ClassVar[str]
    #: The option names a user may override for this family (CLI flags, presets, API).
    override_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ModelSpec, models_dir: Path):
        self.spec = spec
        self.models_dir = models_dir
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        # --cuda-graphs, set by the batch engine for its run: greedy and sampled GPT-2 decoding in
        # same-shaped steps replayed as CUDA graphs (gpt2_decoder.StaticSteps); the same tokens.
        self.cuda_graphs = False

    # ---- hooks for subclasses -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def assets(cls, spec: ModelSpec) -> list[Asset]:
        """Files this model needs, for listing, downloading and error messages."""

    @classmethod
    def presets(cls) -> list[ModelSpec]:
        """The built-in model ids of this family."""
        return []

    @classmethod
    def handles_path(cls, path: Path) -> bool:
        """Whether a user-given file or folder is a checkpoint of this family."""
        return False

    @classmethod
    def spec_for_path(cls, path: Path, model_id: str | None = None, origin: str = "local file") -> ModelSpec:
        """A spec for a local checkpoint of this family (a file or folder)."""
        raise CaptionerError(f"{cls.family} models cannot be loaded from a path.")

    @classmethod
    def discover(cls, models_dir: Path, known: set[Path]) -> list[ModelSpec]:
        """Checkpoints dropped into the models folder that no preset already covers."""
        return []

    @classmethod
    def apply_overrides(cls, spec: ModelSpec, overrides: Mapping[str, Any]) -> ModelSpec:
        """Return ``spec`` with user overrides (e.g. a local weights file) applied."""
        cls.check_override_keys(spec, overrides)
        return spec.with_config(**overrides) if overrides else spec

    @classmethod
    def check_override_keys(cls, spec: ModelSpec, overrides: Mapping[str, Any]) -> None:
        unknown = sorted(set(overrides) - set(cls.override_keys))
        if unknown:
            raise CaptionerError(
                f"Model {spec.id} ({cls.family}) does not take option(s) {', '.join(unknown)}; "
                f"it takes {', '.join(cls.override_keys) or 'none'}.")

    @abstractmethod
    def _load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Read weights and build modules on ``device`` in ``dtype``."""

    @abstractmethod
    def _release(self) -> None:
        """Drop every reference to model modules and tensors."""

    @abstractmethod
    def _preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        """The loaded model's own PIL -> tensor function (see :meth:`preprocessor`)."""

    def _tensor_preprocessor(self) -> TensorPreprocess | None:
        """The same preprocessing on a decoded uint8 tensor (GPU JPEG decoding), None if there is none:
        by default, read from a torchvision pipeline (open_clip's); families with another override."""
        return from_transforms(self._preprocessor())

    @abstractmethod
    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[str]:
        """Caption a stacked batch of preprocessed images; ``options`` are already merged."""

    def _candidates(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> Candidates:
        """``count`` candidates per image made by ``mode`` (beam | sample); families that can override.
        (count 1 never comes here: see :meth:`caption_candidates`.)"""
        raise CaptionerError(f"{self.spec.id} ({self.family}) makes one caption per image; "
                             "use captions_per_image 1 and select model.")

    def _move(self, device: torch.device) -> None:
        """Move loaded modules to ``device`` (for offloading); subclasses with modules override."""
        raise CaptionerError(f"{type(self).__name__} cannot be moved between devices.")

    # ---- shared behaviour -------------------------------------------------------------------
    def preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        """A picklable PIL -> tensor function, safe to run in DataLoader workers (after load)."""
        if not self.loaded:
            raise CaptionerError(f"Load {self.spec.id} before asking for its preprocessing.")
        return self._preprocessor()

    def tensor_preprocessor(self) -> TensorPreprocess | None:
        """The preprocessing as tensor operations for ``--gpu-decode`` (after load), or None."""
        if not self.loaded:
            raise CaptionerError(f"Load {self.spec.id} before asking for its preprocessing.")
        return self._tensor_preprocessor()

    def static_decoding(self, on: torch.Tensor) -> bool:
        """Whether decoding on ``on``'s device takes static steps (``cuda_graphs``, CUDA only)."""
        return self.cuda_graphs and on.device.type == "cuda"

    @property
    def loaded(self) -> bool:
        return self.device is not None

    @property
    def image_size(self) -> int | None:
        """The shorter side the model sees (lets image loading skip unneeded detail)."""
        return None

    def load(self, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto") -> "Captioner":
        target = resolve_device(device)
        target_dtype = resolve_dtype(dtype, target)
        if self.loaded and (self.device, self.dtype) == (target, target_dtype):
            return self
        self.unload()
        # Every file first, all missing ones named in one message (not the first of them after a long load).
        ensure_assets(type(self).assets(self.spec), self.models_dir, model=self.spec.id)
        log.info("Loading %s on %s (%s)", self.spec.id, target, str(target_dtype).removeprefix("torch."))
        try:
            self._load(target, target_dtype)
        except BaseException:
            self._release()  # never leave half a model holding memory
            free_memory(target)
            raise
        self.device, self.dtype = target, target_dtype
        return self

    def unload(self) -> None:
        if not self.loaded:
            return
        device = self.device
        self._release()
        self.device = self.dtype = None
        free_memory(device)

    def to(self, device: str | torch.device) -> "Captioner":
        """Move a loaded model, e.g. to the CPU while the WebUI generates, and back."""
        target = resolve_device(device)
        if self.loaded and target != self.device:
            self._move(target)
            self.device = target
            free_memory()
        return self

    def caption_candidates(self, pixels: torch.Tensor, options: DecodingOptions) -> Candidates:
        """Candidates per image for judging (several captions, best-of-N); ``options`` already merged.
        One plain caption per image unless the options ask for more (see :func:`candidate_request`)."""
        count, mode = candidate_request(options)
        if count == 1:
            return self._plain_candidates(pixels, options)
        return self._candidates(pixels, options, count, mode)

    def _plain_candidates(self, pixels: torch.Tensor, options: DecodingOptions) -> Candidates:
        """Today's one caption per image, with the image features when the family has them."""
        return Candidates([[text] for text in self.caption_pixels(pixels, options)])

    def decoding_options(self, options: DecodingOptions | Mapping[str, Any] | None = None) -> DecodingOptions:
        if not isinstance(options, DecodingOptions):
            options = DecodingOptions.from_mapping(options)
        return options.merged(self.spec.decoding)

    def caption(self, images: Sequence[Image.Image | EncodedImage],
                options: DecodingOptions | Mapping[str, Any] | None = None) -> list[str]:
        """Caption PIL images (any mode) or encoded ones in one batch.

        Each image is decoded (if encoded) and preprocessed in turn, so only one full-size image is in
        memory at a time.
        """
        if not images:
            return []
        options = self.decoding_options(options)  # bad options fail before any work
        if not self.loaded:
            self.load()
        preprocess = self.preprocessor()
        pixels = torch.stack([preprocess(image.decode() if isinstance(image, EncodedImage) else to_rgb(image))
                              for image in images])
        return self.caption_pixels(pixels, options)
