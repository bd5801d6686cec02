"""CLIPScore (Hessel et al. 2021): how well a caption matches its image, by a CLIP model.

``clip_score = 2.5 * max(cos(image embedding, text embedding), 0)``, from 0 to 2.5 (well-matched
captions of photos score about 0.7-1.0 with ViT-L-14). The image embedding is the one the
captioner already computed when it has its own CLIP (CLIP-prefix, SBG); otherwise (FuseCap, or
several models ranked together) a scoring CLIP encodes the images once more (``--score-clip``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from captioners.clip_backbone import ClipBackbone, ClipSpec, clip_assets, load_clip
from captioners.errors import CaptionerError

log = logging.getLogger(__name__)

CLIPSCORE_WEIGHT = 2.5  # Hessel et al.'s w: rescales cosines of typical pairs towards [0, 1]
DEFAULT_SCORE_CLIP = "ViT-L-14:openai"


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(B, D) and (B, D) L2-normalised embeddings -> (B,) CLIPScores, row by row."""
    cosine = (image_features.float() * text_features.float()).sum(dim=-1)
    return CLIPSCORE_WEIGHT * cosine.clamp(min=0)


def parse_score_clip(text: str) -> ClipSpec:
    """``ARCH[:WEIGHTS]`` (``ViT-L-14``, ``ViT-L-14:openai``, ``ViT-B-32:/path/weights.safetensors``) as a
    ClipSpec; OpenAI's weights use QuickGELU as they were trained."""
    arch, _, weights = str(text).strip().partition(":")
    if not arch:
        raise CaptionerError(f"score CLIP {text!r}: give ARCH[:WEIGHTS], e.g. {DEFAULT_SCORE_CLIP}.")
    weights = weights or "openai"
    return ClipSpec(arch, weights, quick_gelu=True if weights == "openai" else None)


def scoring_assets(spec: ClipSpec) -> list[Any]:
    """The files of a scoring CLIP; a missing one points at --score-clip (not the model's --clip-weights)."""
    from dataclasses import replace

    return [replace(asset, option="--score-clip") for asset in clip_assets(spec)]


@dataclass
class ScoringClip:
    """A CLIP used only for scoring: its assets, and the model once loaded."""

    spec: ClipSpec
    models_dir: Path
    backbone: ClipBackbone | None = None

    def assets(self) -> list[Any]:
        return scoring_assets(self.spec)

    def load(self, device: torch.device, dtype: torch.dtype) -> ClipBackbone:
        if self.backbone is None:
            from captioners.weights import ensure_assets

            ensure_assets(self.assets(), self.models_dir, model=f"score CLIP {self.spec.label}")
            log.info("Loading the scoring CLIP %s", self.spec.label)
            self.backbone = load_clip(self.spec, self.models_dir, device, dtype)
        return self.backbone

    def preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        if self.backbone is None:
            raise CaptionerError("Load the scoring CLIP before asking for its preprocessing.")
        return self.backbone.preprocess

    def unload(self) -> None:
        self.backbone = None


def score_groups(clip: ClipBackbone, image_features: torch.Tensor, groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """CLIPScore of every caption of every image: one text-encoding pass for the whole batch."""
    texts = [text for group in groups for text in group]
    if not texts:
        return [[] for _ in groups]
    text_features = clip.encode_texts(texts)
    owners = torch.tensor([i for i, group in enumerate(groups) for _ in group], device=image_features.device)
    scores = clip_scores(image_features.index_select(0, owners), text_features.to(image_features.device)).tolist()
    out, start = [], 0
    for group in groups:
        out.append([round(value, 4) for value in scores[start:start + len(group)]])
        start += len(group)
    return out
