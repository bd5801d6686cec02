"""CLIP image/text encoders through open_clip, from open_clip's download or a local file."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from captioners.errors import CaptionerError, MissingWeightsError
from captioners.weights import load_state_dict

log = logging.getLogger(__name__)

# Only keys of OpenAI's TorchScript archives that are not model weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load.

    ``arch`` is an open_clip model name; ``weights`` an open_clip pretrained tag (``openai``) or a
    path to a local file; ``config`` an optional open_clip model-config JSON for architectures
    open_clip does not know (its file stem becomes the architecture name, replacing ``arch``).
    """

    arch: str = "ViT-L-14"
    weights: str = "openai"
    config: str | None = None
    quick_gelu: bool = True  # OpenAI's CLIP weights were trained with QuickGELU

    def weights_is_file(self) -> bool:
        return os.sep in self.weights or "/" in self.weights or Path(self.weights).suffix in (
            ".pt", ".pth", ".bin", ".safetensors")

    @property
    def label(self) -> str:
        return f"{self.arch} ({Path(self.weights).name if self.weights_is_file() else self.weights})"

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ClipSpec":
        """This spec with the CLIP options a user gave (``clip_arch``, ``clip_weights``, ``clip_config``)."""
        changes = {field: overrides[key] for key, field in CLIP_OVERRIDES if overrides.get(key)}
        return replace(self, **changes) if changes else self


# User options (CLI --clip-arch etc., presets.json keys) -> ClipSpec fields.
CLIP_OVERRIDES = (("clip_arch", "arch"), ("clip_weights", "weights"), ("clip_config", "config"))


class ClipBackbone:
    """A loaded CLIP model with its preprocessing and tokenizer."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, spec: ClipSpec):
        self.model = model
        self.preprocess = preprocess  # PIL image -> (3, H, W) float tensor; picklable for workers
        self.tokenizer = tokenizer
        self.spec = spec

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
        features = self.model.encode_image(pixels.to(self.device, self.dtype, non_blocking=True)).float()
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
    import open_clip

    arch = spec.arch
    if spec.config:
        config = Path(spec.config)
        if not config.is_file():
            raise MissingWeightsError(f"CLIP model config not found: {config}")
        open_clip.add_model_config(str(config))  # registers the architecture under the file's stem
        arch = config.stem
    if arch not in open_clip.list_models():
        raise CaptionerError(f"open_clip has no CLIP architecture {arch!r}; pass a model config with --clip-config.")

    if spec.weights_is_file():
        model, preprocess = _create(open_clip, arch, None, spec, models_dir)
        weights = Path(spec.weights).expanduser()
        if not weights.is_file():
            raise MissingWeightsError(f"CLIP weights file not found: {weights}")
        model.load_state_dict(_read_clip_state_dict(weights, set(model.state_dict())), strict=True)
    else:
        model, preprocess = _create(open_clip, arch, spec.weights or None, spec, models_dir)
    model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return ClipBackbone(model, preprocess, open_clip.get_tokenizer(arch), spec)


def _create(open_clip, arch: str, pretrained: str | None, spec: ClipSpec, models_dir: Path):
    cache_dir = models_dir / "clip"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, force_quick_gelu=spec.quick_gelu, cache_dir=str(cache_dir))
    except RuntimeError as exc:
        if pretrained and ("download" in str(exc).lower() or "pretrained" in str(exc).lower()):
            raise MissingWeightsError(_clip_missing(arch, pretrained, cache_dir, exc)) from exc
        raise
    except OSError as exc:  # network errors, hub offline mode
        raise MissingWeightsError(_clip_missing(arch, pretrained, cache_dir, exc)) from exc
    return model, preprocess


def _clip_missing(arch: str, pretrained: str | None, cache_dir: Path, exc: Exception) -> str:
    return (f"CLIP {arch} weights '{pretrained}' are not in {cache_dir} and could not be downloaded "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). Run once with network access "
            "so open_clip can download them there, or pass a local weights file (--clip-weights PATH).")


def _read_clip_state_dict(path: Path, expected: set[str]) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors" and _is_torchscript(path):
        # OpenAI's original .pt files are TorchScript archives (TorchScript code, not pickle); they
        # also keep non-weight buffers such as attention masks, which the model rebuilds itself.
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        state = {k: v for k, v in state.items() if k in expected}
    else:
        state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name.endswith("/code/__torch__.py") for name in archive.namelist())
