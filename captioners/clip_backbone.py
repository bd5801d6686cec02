"""CLIP image/text encoders through open_clip, with weights from the models folder or a local file.

open_clip builds the network; its weights are an ordinary :class:`~captioners.weights.Asset`:
listed by ``models``, fetched by ``download`` (through huggingface_hub, so ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` apply), and read by :func:`captioners.weights.load_state_dict`, which never runs
code from a file (open_clip itself would ``torch.jit.load`` OpenAI's TorchScript files).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from captioners import vit_encoder
from captioners.errors import CaptionerError, MissingWeightsError
from captioners.weights import Asset, ensure_asset, load_state_dict

log = logging.getLogger(__name__)

# Only keys of OpenAI's TorchScript archives that are not model weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
CLIP_FOLDER = "clip"
# The hub copies of OpenAI's CLIP weights that open_clip >= 2.23 downloads (the pinned open_clip 2.20
# of A1111 and Forge only knows OpenAI's own URLs); open_clip's layout, safetensors preferred.
OPENAI_HUB_REPOS = {
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "RN50x4": "timm/resnet50x4_clip.openai",
}
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load.

    ``arch`` is an open_clip model name; ``weights`` an open_clip pretrained tag (``openai``) or a
    path to a local file; ``config`` an optional open_clip model-config JSON for architectures
    open_clip does not know (its file stem becomes the architecture name, replacing ``arch``).
    ``quick_gelu``: None follows the weights' publisher (open_clip's record of the tag) or, for a
    file or a custom config, the architecture's own config; the built-in presets set True, as
    OpenAI's weights were trained with QuickGELU.
    """

    arch: str = "ViT-L-14"
    weights: str = "openai"
    config: str | None = None
    quick_gelu: bool | None = None

    def weights_is_file(self) -> bool:
        return _is_file_name(self.weights)

    @property
    def arch_name(self) -> str:
        """The architecture open_clip builds: a custom config's file stem, else ``arch``."""
        return Path(self.config).stem if self.config else self.arch

    @property
    def label(self) -> str:
        return f"{self.arch_name} ({Path(self.weights).name if self.weights_is_file() else self.weights})"

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ClipSpec":
        """This spec with the CLIP options a user gave (``clip_arch``, ``clip_weights``, ``clip_config``).

        A custom config or another pretrained tag decides QuickGELU anew (the config's own value, the
        tag publisher's); a weights file or another built-in architecture keeps the spec's choice, as
        the families' checkpoints were trained with OpenAI's CLIPs.
        """
        changes: dict[str, Any] = {field: overrides[key] for key, field in CLIP_OVERRIDES if overrides.get(key)}
        if not changes:
            return self
        if "config" in changes or not _is_file_name(changes.get("weights", "x.pt")):
            changes["quick_gelu"] = None
        return replace(self, **changes)


def _is_file_name(weights: str) -> bool:
    return os.sep in weights or "/" in weights or Path(weights).suffix in WEIGHT_FILE_SUFFIXES


# User options (CLI --clip-arch etc., presets.json keys) -> ClipSpec fields.
CLIP_OVERRIDES = (("clip_arch", "arch"), ("clip_weights", "weights"), ("clip_config", "config"))


def clip_weights_asset(spec: ClipSpec) -> Asset:
    """Where this CLIP's weights live in the models folder and where they come from.

    A local file is itself the asset. A pretrained tag maps to a hub repository (OpenAI's weights:
    timm's copies; other tags: what open_clip records), else to open_clip's download URL. Copies
    that earlier versions of this package let open_clip cache under ``<models>/clip`` still count.
    """
    if spec.weights_is_file():
        return Asset(str(Path(spec.weights).expanduser().resolve()), option="--clip-weights")
    repo, filename, url = _pretrained_source(spec)
    # open_clip 2.20 downloaded OpenAI's weights from OpenAI's URL, named <arch>.pt, into <models>/clip.
    url_name = url.rsplit("/", 1)[-1] if url else f"{spec.arch_name}.pt" if spec.weights == "openai" else None
    legacy_url = (f"{CLIP_FOLDER}/{url_name}",) if url_name else ()
    if repo:
        files = (filename,) if filename else HUB_FILES
        cache = f"{CLIP_FOLDER}/models--{repo.replace('/', '--')}/snapshots/*/"
        return Asset(f"{CLIP_FOLDER}/{repo.replace('/', '--')}", repo_id=repo, repo_files=files, is_dir=True,
                     required=("|".join(files),), option="--clip-weights",
                     fallbacks=tuple(cache + name for name in files) + legacy_url)
    if url:
        return Asset(legacy_url[0], file_url=url, option="--clip-weights")
    return Asset(f"{CLIP_FOLDER}/{spec.arch_name}-{spec.weights}", option="--clip-weights",
                 url=f"(open_clip knows no weights {spec.weights!r} for {spec.arch_name}; "
                     "pass a local file with --clip-weights)")


def clip_assets(spec: ClipSpec) -> list[Asset]:
    """Every file this CLIP needs: its weights, and a custom architecture's config."""
    path = Path(spec.config).expanduser().resolve() if spec.config else None
    # A config has no converted copy: a .safetensors of the same name beside it is its weights.
    config = [Asset(str(path), option="--clip-config", converted_suffix=path.suffix)] if path else []
    return [clip_weights_asset(spec), *config]


def _pretrained_source(spec: ClipSpec) -> tuple[str | None, str | None, str | None]:
    """(hub repo, file in it or None for the usual names, direct URL) of a pretrained tag."""
    if spec.weights == "openai" and spec.arch_name in OPENAI_HUB_REPOS:
        return OPENAI_HUB_REPOS[spec.arch_name], None, None
    cfg = _pretrained_cfg(spec)
    hub = (cfg.get("hf_hub") or "").strip("/")
    repo, filename = (hub.rsplit("/", 1) if hub.count("/") > 1 else (hub, None)) if hub else (None, None)
    return repo, filename, cfg.get("url") or None


def _pretrained_cfg(spec: ClipSpec) -> dict[str, Any]:
    if spec.weights_is_file() or spec.config:
        return {}
    open_clip = _import_open_clip()
    try:
        return dict(open_clip.get_pretrained_cfg(spec.arch_name, spec.weights) or {})
    except Exception:  # an open_clip without this function or without the tag
        return {}


def resolved_quick_gelu(spec: ClipSpec) -> bool:
    """Whether to force QuickGELU: the spec's own choice, else the publisher's, else the config's."""
    if spec.quick_gelu is not None:
        return spec.quick_gelu
    if spec.weights_is_file() or spec.config:
        return False  # not forced: the architecture config's own "quick_gelu" applies
    return bool(_pretrained_cfg(spec).get("quick_gelu", spec.weights == "openai"))


class ClipBackbone:
    """A loaded CLIP model with its preprocessing and tokenizer."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, spec: ClipSpec):
        self.model = model
        self.preprocess = preprocess  # PIL image -> (3, H, W) float tensor; picklable for workers
        self.tokenizer = tokenizer
        self.spec = spec
        # On a CPU a ViT tower runs through our own forward (same weights, same embeddings to fp32
        # rounding, fewer allocations: captioners/vit_encoder.py); elsewhere, and for towers it does
        # not know, open_clip's own. On a GPU open_clip's fused attention path is not memory bound.
        visual = getattr(model, "visual", None)
        reason = vit_encoder.unsupported_reason(visual) if visual is not None else "no image tower"
        self.own_vit = vit_encoder.OwnViTForward(visual) if reason is None else None
        if reason:
            log.debug("CLIP %s: open_clip's own image forward (%s)", spec.label, reason)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else -1

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ClipBackbone":
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, D) float32 embeddings."""
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        encode = self.own_vit if self.own_vit is not None and pixels.device.type == "cpu" else self.model.encode_image
        features = encode(pixels).float()
        return features / features.norm(dim=-1, keepdim=True) if normalize else features

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, D) L2-normalised float32 embeddings."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            features = self.model.encode_text(tokens).float()
            chunks.append(features / features.norm(dim=-1, keepdim=True))
        if not chunks:
            return torch.empty(0, max(self.embed_dim, 0), device=self.device)
        return torch.cat(chunks)


def load_clip(spec: ClipSpec, models_dir: Path, device: torch.device, dtype: torch.dtype) -> ClipBackbone:
    open_clip = _import_open_clip()
    if spec.config:
        config = Path(spec.config)
        if not config.is_file():
            raise MissingWeightsError(f"CLIP model config not found: {config}")
        open_clip.add_model_config(str(config))  # registers the architecture under the file's stem
    arch = spec.arch_name
    if arch not in open_clip.list_models():
        raise CaptionerError(f"open_clip has no CLIP architecture {arch!r}; pass a model config with --clip-config.")
    weights = _weights_file(ensure_asset(clip_weights_asset(spec), models_dir))
    model, preprocess = _create(open_clip, arch, spec)
    mismatch = _load_weights(model, _read_clip_state_dict(weights, set(model.state_dict())))
    if mismatch:
        raise CaptionerError(f"CLIP weights {weights} do not fit {arch} ({mismatch}); use the weights of this "
                             "architecture (--clip-weights) or its config (--clip-config).")
    model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return ClipBackbone(model, preprocess, open_clip.get_tokenizer(arch), spec)


def _weights_file(location: Path) -> Path:
    """The weights file of a hub folder (safetensors first), or the file itself."""
    if location.is_dir():
        return next(location / name for name in (*HUB_FILES, "") if (location / name).is_file())
    return location


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Load ``state`` strictly; what does not fit, or None."""
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        return f"{len(missing)} tensors missing: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the same names with other shapes: another size of the architecture
        return str(exc).strip().splitlines()[-1].strip()[:200]
    return None


def _import_open_clip() -> Any:
    """open_clip, imported without the FutureWarnings its pinned versions' imports print (timm's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import open_clip
    return open_clip


class _NoRandomInitNotice(logging.Filter):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger when
    built without a tag; here the weights are loaded right after, so the notice would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _create(open_clip: Any, arch: str, spec: ClipSpec) -> tuple[torch.nn.Module, Callable]:
    """The network (random weights) and its preprocessing, as the weights' publisher defines it."""
    cfg = _pretrained_cfg(spec)
    accepted = inspect.signature(open_clip.create_model_and_transforms).parameters
    extra = {f"image_{key}": cfg[key] for key in ("mean", "std", "interpolation", "resize_mode")
             if cfg.get(key) and f"image_{key}" in accepted}
    quiet = _NoRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None, force_quick_gelu=resolved_quick_gelu(spec), **extra)
    finally:
        root.removeFilter(quiet)
    return model, preprocess


def _read_clip_state_dict(path: Path, expected: set[str]) -> dict[str, torch.Tensor]:
    """Any CLIP weights file, read without running code from it (OpenAI's own .pt files are TorchScript
    archives: their tensors are read by captioners.torch_archive, their code never runs). Such archives
    also keep non-weight buffers (attention masks) the model rebuilds itself: only expected keys stay."""
    state = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
    return {k: v for k, v in state.items() if k in expected and k not in _OPENAI_EXTRA_KEYS}
