"""CLIP-prefix captioning (ClipCap): CLIP image embedding -> mapping network -> GPT-2 prefix.

Covers Anshler's ICG checkpoints (open_clip ViT-L-14, normalised embedding, Flickr-style output)
and rmokady's ClipCap checkpoints (ViT-B/32 MLP with raw embedding, RN50x4 transformer mapper).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from captioners.base import Candidates, Captioner, ModelSpec
from captioners.clip_backbone import ClipBackbone, ClipSpec, clip_assets, load_clip
from captioners.errors import CaptionerError
from captioners.families.clipcap_modules import ClipPrefixLayout, ClipPrefixModel, inspect_state_dict
from captioners.options import DecodingOptions
from captioners.prefix_decoding import (beam_candidates, beam_search, decode_tokens, greedy_chooser, max_steps,
                                        sampling_chooser)
from captioners.text import GPT2_TOKENIZER, load_gpt2_tokenizer, tokenizer_asset
from captioners.weights import WEIGHT_SUFFIXES, Asset, ensure_asset, load_state_dict, read_checkpoint_shapes

log = logging.getLogger(__name__)

FAMILY = "clip-prefix"
FOLDER = "clip_prefix"
POSTPROCESS_STYLES = ("icg", "clipcap", "none")



def _openai_clip(arch: str) -> ClipSpec:
    return ClipSpec(arch, "openai", quick_gelu=True)  # OpenAI's CLIPs were trained with QuickGELU


# CLIP width -> the CLIP each publisher trained with (the checkpoint cannot say which).
CLIP_BY_WIDTH = {512: _openai_clip("ViT-B-32"), 640: _openai_clip("RN50x4"), 768: _openai_clip("ViT-L-14")}
# The first layer of each mapping network: its input width is the CLIP embedding's.
MAPPING_INPUTS = ("clip_project.model.0.weight", "clip_project.weight", "clip_project.linear.weight")


@dataclass(frozen=True)
class ClipPrefixConfig:
    weights: Asset
    clip: ClipSpec | None = None      # None: chosen from the checkpoint's CLIP width
    tokenizer: Asset = GPT2_TOKENIZER
    normalize: bool | None = None     # L2-normalise the CLIP embedding; None: from the layout
    postprocess: str | None = None    # icg | clipcap | none; None: from the layout
    gpt_heads: int | None = None      # not in the checkpoint; default n_embd // 64
    mapper_heads: int = 8             # not in the checkpoint; ClipCap used 8


DEFAULT_DECODING = DecodingOptions(strategy="greedy", max_new_tokens=67, num_beams=5, temperature=1.0, top_p=0.8)


def _anshler(name: str) -> Asset:
    return Asset(f"{FOLDER}/{name}", repo_id="Anshler/clip-prefix", repo_files=(name,))


def _icg_spec(model_id: str, filename: str, description: str) -> ModelSpec:
    return ModelSpec(
        model_id, FAMILY,
        ClipPrefixConfig(_anshler(filename), _openai_clip("ViT-L-14"), normalize=True, postprocess="icg"),
        DEFAULT_DECODING,
        description)


def _clipcap_mlp_spec(model_id: str, filename: str, repo_id: str, description: str) -> ModelSpec:
    # rmokady's MLP checkpoints map the raw (not normalised) ViT-B/32 embedding.
    weights = Asset(f"{FOLDER}/{filename}", repo_id=repo_id, repo_files=(filename,))
    return ModelSpec(model_id, FAMILY,
                     ClipPrefixConfig(weights, _openai_clip("ViT-B-32"), normalize=False, postprocess="clipcap"),
                     DEFAULT_DECODING, description)


PRESETS: list[ModelSpec] = [
    _icg_spec("clip-prefix-flickr8k", "flickr8k.pt", "ICG CLIP-prefix, Flickr8k (ViT-L-14)"),
    _icg_spec("clip-prefix-flickr8k-gradient", "flickr8k_gradient.pt",
              "ICG CLIP-prefix, Flickr8k, gradient clipping (ViT-L-14; the ICG extension's model)"),
    _icg_spec("clip-prefix-flickr30k", "flickr30k.pt", "ICG CLIP-prefix, Flickr30k (ViT-L-14)"),
    _icg_spec("clip-prefix-flickr30k-gradient", "flickr30k_gradient.pt",
              "ICG CLIP-prefix, Flickr30k, gradient clipping (ViT-L-14)"),
    _clipcap_mlp_spec("clipcap-coco", "coco_weights.pt", "akhaliq/CLIP-prefix-captioning-COCO-weights",
                      "ClipCap COCO, MLP mapper, GPT-2 fine-tuned (ViT-B/32)"),
    _clipcap_mlp_spec("clipcap-conceptual", "conceptual_weights.pt",
                      "akhaliq/CLIP-prefix-captioning-conceptual-weights",
                      "ClipCap Conceptual Captions, MLP mapper, GPT-2 fine-tuned (ViT-B/32)"),
    ModelSpec(
        "clipcap-coco-transformer", FAMILY,
        ClipPrefixConfig(Asset(f"{FOLDER}/transformer_weights.pt",
                               url="https://drive.google.com/file/d/1GYPToCqFREwi285wPLhuVExlz7DDUDfJ "
                                   "(save it as transformer_weights.pt)"),
                         _openai_clip("RN50x4"), normalize=True, postprocess="clipcap"),
        DEFAULT_DECODING.replace(strategy="beam"),
        "ClipCap COCO, transformer mapper, frozen GPT-2 (RN50x4)"),
]


def postprocess_caption(text: str, style: str) -> str:
    if style == "icg":  # Flickr style, as the ICG extension prints it: "a dog runs on the grass ."
        return text.split(".")[0].strip() + " ."
    return text.strip()


class ClipPrefixCaptioner(Captioner):
    family = FAMILY
    override_keys = ("weights", "clip_arch", "clip_weights", "clip_config", "tokenizer", "normalize",
                     "postprocess", "gpt_heads", "mapper_heads")

    def __init__(self, spec: ModelSpec, models_dir: Path):
        super().__init__(spec, models_dir)
        self.model: ClipPrefixModel | None = None
        self.clip: ClipBackbone | None = None
        self.tokenizer: Any = None
        self.stop_token = -1
        self.normalize = True
        self.postprocess_style = "none"
        self.null_prefix: torch.Tensor | None = None  # specificity guidance's unconditional prefix

    @classmethod
    def assets(cls, spec: ModelSpec) -> list[Asset]:
        config: ClipPrefixConfig = spec.config
        clip = config.clip or _clip_from_shapes(config.weights)
        return [config.weights, config.tokenizer, *(clip_assets(clip) if clip else [])]

    @classmethod
    def presets(cls) -> list[ModelSpec]:
        return PRESETS

    @classmethod
    def handles_path(cls, path: Path) -> bool:
        return path.is_file() and path.suffix in WEIGHT_SUFFIXES

    @classmethod
    def spec_for_path(cls, path: Path, model_id: str | None = None, origin: str = "local file") -> ModelSpec:
        """Any ClipCap-layout file; CLIP, normalisation and clean-up follow from its layout at load."""
        return ModelSpec(model_id or f"local:{path.stem}", FAMILY, ClipPrefixConfig(Asset(str(path.resolve()))),
                         DEFAULT_DECODING, f"CLIP-prefix checkpoint {path.name}", origin)

    @classmethod
    def discover(cls, models_dir: Path, known: set[Path]) -> list[ModelSpec]:
        folder = models_dir / FOLDER
        if not folder.is_dir():
            return []
        specs = []
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            # A .pt converted to .safetensors beside it is one model; presets own their own files.
            has_converted_twin = path.suffix != ".safetensors" and path.with_suffix(".safetensors").is_file()
            if has_converted_twin or path.resolve() in known or path.with_suffix(".pt").resolve() in known:
                continue
            specs.append(cls.spec_for_path(path))
        return specs

    @classmethod
    def apply_overrides(cls, spec: ModelSpec, overrides: Mapping[str, Any]) -> ModelSpec:
        cls.check_override_keys(spec, overrides)
        config: ClipPrefixConfig = spec.config
        changes: dict[str, Any] = {}
        if overrides.get("weights"):
            changes["weights"] = Asset(str(Path(overrides["weights"]).expanduser().resolve()))
        if overrides.get("tokenizer"):
            changes["tokenizer"] = tokenizer_asset(overrides["tokenizer"])
        base = config.clip or _openai_clip("ViT-L-14")
        clip = base.with_overrides(overrides)
        if clip is not base:  # only when the user named a CLIP option
            changes["clip"] = clip
        for key in ("normalize", "postprocess", "gpt_heads", "mapper_heads"):
            if overrides.get(key) is not None:
                changes[key] = overrides[key]
        if changes.get("postprocess") not in (None, *POSTPROCESS_STYLES):
            raise CaptionerError(f"postprocess must be one of {', '.join(POSTPROCESS_STYLES)}.")
        return replace(spec, config=replace(config, **changes))

    @property
    def image_size(self) -> int | None:
        return _clip_image_size(self.clip) if self.clip else None

    def _load(self, device: torch.device, dtype: torch.dtype) -> None:
        config: ClipPrefixConfig = self.spec.config
        state = load_state_dict(ensure_asset(config.weights, self.models_dir))
        layout = inspect_state_dict(state)
        self.tokenizer = load_gpt2_tokenizer(ensure_asset(config.tokenizer, self.models_dir))
        if len(self.tokenizer) > layout.vocab_size:
            raise CaptionerError(f"Tokenizer has {len(self.tokenizer)} tokens but the checkpoint only "
                                 f"{layout.vocab_size}: use the tokenizer the model was trained with.")
        self.stop_token = self.tokenizer.encode(".")[0]
        model = ClipPrefixModel(layout, config.gpt_heads, config.mapper_heads)
        model.load_checkpoint(state)
        del state
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.null_prefix = null_prefix(self.model, layout.prefix_size)
        self.normalize, self.postprocess_style = _conventions(config, layout)
        clip_spec = config.clip or _clip_for_width(layout.prefix_size)
        self.clip = load_clip(clip_spec, self.models_dir, device, dtype)
        clip_width = self.clip.embed_dim
        if clip_width not in (-1, layout.prefix_size):
            raise CaptionerError(f"CLIP {clip_spec.label} gives {clip_width}-d embeddings but the checkpoint "
                                 f"expects {layout.prefix_size}-d: choose the CLIP it was trained with.")
        log.info("Loaded %s: %s mapper, prefix %d, CLIP %s, normalise=%s", self.spec.id, layout.mapping,
                 layout.prefix_length, clip_spec.label, self.normalize)

    def _release(self) -> None:
        self.model = self.clip = self.tokenizer = self.null_prefix = None

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        self.clip.to(device)
        self.null_prefix = self.null_prefix.to(device)

    def _preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.clip.preprocess

    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[str]:
        return [group[0] for group in self._plain_candidates(pixels, options).texts]

    def _plain_candidates(self, pixels: torch.Tensor, options: DecodingOptions) -> Candidates:
        embeddings, prefix = self._encode(pixels)
        texts = [[self._text(tokens, options)] for tokens in self.decode(prefix, options)]
        return Candidates(texts, self._features(embeddings), self.clip)

    def _candidates(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> Candidates:
        """The ``count`` best beams of one search per image (width at least ``count``), or ``count``
        samples per image, sample j drawn from stream j of the seed (so sample 0 is the plain sample)."""
        embeddings, prefix = self._encode(pixels)
        steps = self._steps(options)
        guidance = dict(guidance=options.guidance or 0.0, null_prefix=self.null_prefix)
        if mode == "beam":
            beams = max(options.num_beams or 5, count)
            groups = beam_candidates(self.model.gpt, prefix, self.stop_token, steps, beams, count,
                                     options.temperature or 1.0, **guidance)
        else:
            streams = [j for _ in range(prefix.shape[0]) for j in range(count)]
            choose = sampling_chooser(options.temperature or 1.0, options.top_p or 1.0, options.top_k, options.seed,
                                      len(streams), streams)
            flat = decode_tokens(self.model.gpt, prefix.repeat_interleave(count, dim=0), self.stop_token, steps,
                                 choose, **guidance, static=self.static_decoding(prefix))
            groups = [flat[i:i + count] for i in range(0, len(flat), count)]
        texts = [[self._text(tokens, options) for tokens in group] for group in groups]
        return Candidates(texts, self._features(embeddings), self.clip)

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLIP embeddings of the images (as the mapper takes them) and their GPT-2 prefixes."""
        embeddings = self.clip.encode_images(pixels, normalize=self.normalize)
        with torch.inference_mode():
            return embeddings, self.model.prefix(embeddings)

    def _features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings for CLIPScore: the ones already computed, not a second encode."""
        return embeddings if self.normalize else embeddings / embeddings.norm(dim=-1, keepdim=True)

    def _text(self, tokens: list[int], options: DecodingOptions) -> str:
        style = self.postprocess_style if options.postprocess is not False else "none"
        return postprocess_caption(self.tokenizer.decode(tokens), style)

    def _steps(self, options: DecodingOptions) -> int:
        layout = self.model.layout
        return max_steps(options.max_new_tokens or 67, layout.prefix_length, layout.n_positions)

    def decode(self, prefix: torch.Tensor, options: DecodingOptions) -> list[list[int]]:
        steps = self._steps(options)
        gpt = self.model.gpt
        guidance = dict(guidance=options.guidance or 0.0, null_prefix=self.null_prefix)
        if options.strategy == "beam":
            return beam_search(gpt, prefix, self.stop_token, steps, options.num_beams or 5, options.temperature or 1.0,
                               **guidance)
        if options.strategy == "sample":
            choose = sampling_chooser(options.temperature or 1.0, options.top_p or 1.0, options.top_k, options.seed,
                                      prefix.shape[0])
        else:
            choose = greedy_chooser()
        return decode_tokens(gpt, prefix, self.stop_token, steps, choose, **guidance, static=self.static_decoding(prefix))


@torch.inference_mode()
def null_prefix(model: ClipPrefixModel, width: int) -> torch.Tensor:
    """The guidance's unconditional prefix: the mapping network applied to an all-zero CLIP embedding
    (no image at all), shape (1, prefix_length, gpt width). Fixed per checkpoint, documented in README."""
    parameter = next(model.parameters())
    return model.prefix(torch.zeros(1, width, device=parameter.device, dtype=parameter.dtype))


def _clip_from_shapes(weights: Asset) -> ClipSpec | None:
    """The default CLIP of a local checkpoint, read from its first mapping layer's shape without
    loading it (None when the file is absent or its shapes cannot be read cheaply)."""
    if not Path(weights.local).is_absolute() or not Path(weights.local).is_file():
        return None
    shapes = read_checkpoint_shapes(Path(weights.local)) or {}
    width = next((shapes[key][1] for key in MAPPING_INPUTS if len(shapes.get(key, ())) == 2), None)
    return CLIP_BY_WIDTH.get(width)


def _clip_for_width(width: int) -> ClipSpec:
    if width not in CLIP_BY_WIDTH:
        raise CaptionerError(f"No default CLIP gives {width}-d embeddings; pass --clip-arch and --clip-weights.")
    return CLIP_BY_WIDTH[width]


def _conventions(config: ClipPrefixConfig, layout: ClipPrefixLayout) -> tuple[bool, str]:
    """Normalisation and clean-up: explicit settings win, else what the publisher of this layout used."""
    guess = layout.family_guess
    normalize = config.normalize if config.normalize is not None else guess != "clipcap-mlp"
    postprocess = config.postprocess or ("icg" if guess == "icg" else "clipcap")
    return normalize, postprocess


def _clip_image_size(clip: ClipBackbone) -> int | None:
    size = getattr(getattr(clip.model, "visual", None), "image_size", None)
    if isinstance(size, (tuple, list)):
        return int(min(size))
    return int(size) if size else None
