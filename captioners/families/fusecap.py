"""FuseCap: a BLIP-base captioner trained on fused, enriched captions (noamrot/FuseCap).

Runs through transformers' ``BlipForConditionalGeneration`` and ``BlipProcessor``. Weights are read
by :func:`captioners.weights.load_state_dict` (safetensors preferred, ``.bin`` only with
``weights_only=True``) and handed to ``from_pretrained`` as a state dict, so no transformers
version ever unpickles them freely.

Decoding arguments are always passed explicitly: transformers 4.x took FuseCap's ``num_beams 3`` /
``max_length 60`` from the text config, 5.x ignores them there (greedy, 20 new tokens).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from captioners.base import Captioner, ModelSpec
from captioners.errors import CaptionerError, CheckpointLayoutError
from captioners.options import DecodingOptions
from captioners.sampling import RowSampler, row_generators
from captioners.text import HUB_ID
from captioners.weights import Asset, ensure_asset, load_state_dict

log = logging.getLogger(__name__)

FAMILY = "fusecap"
FOLDER = "fusecap"
REPO_ID = "noamrot/FuseCap"
# The model card is served under both ids; they hold the same files, so they share one folder.
SAME_MODEL = {"noamrot/fusecap", "noamrot/fusecap_image_captioning"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
REPO_FILES = ("config.json", "preprocessor_config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", *WEIGHT_FILES)
# transformers 5 saves processor_config.json where older versions (and the hub repo) have preprocessor_config.json.
REQUIRED = ("config.json", "preprocessor_config.json|processor_config.json", "vocab.txt", "|".join(WEIGHT_FILES))

# A buffer, persistent in transformers 4.30 (so saved and expected then) and not since: optional both ways.
LEGACY_KEYS = ("text_decoder.bert.embeddings.position_ids",)
# The output projection shares its matrix with the word embeddings; files may hold only one of them.
TIED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight")


@dataclass(frozen=True)
class FuseCapConfig:
    weights: Asset
    max_length: int = 60  # tokens including the prompt, FuseCap's text_config.max_length


DEFAULT_DECODING = DecodingOptions(strategy="beam", num_beams=3, prompt="a picture of ", keep_prompt=False,
                                   temperature=1.0, top_p=1.0)


def hub_asset(repo_id: str) -> Asset:
    folder = "FuseCap" if repo_id.lower() in SAME_MODEL else repo_id.replace("/", "--")
    return Asset(f"{FOLDER}/{folder}", repo_id=repo_id, repo_files=REPO_FILES, is_dir=True, required=REQUIRED)


def folder_asset(path: Path) -> Asset:
    return Asset(str(path.expanduser().resolve()), is_dir=True, required=REQUIRED)


PRESETS = [ModelSpec(FAMILY, FAMILY, FuseCapConfig(hub_asset(REPO_ID)), DEFAULT_DECODING,
                     "FuseCap BLIP-base: long, detailed captions (noamrot/FuseCap)")]


class BlipPixels:
    """PIL image -> (3, H, W) pixels through the model's own BlipImageProcessor (picklable)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class FuseCapCaptioner(Captioner):
    family = FAMILY
    override_keys = ("weights",)

    def __init__(self, spec: ModelSpec, models_dir: Path):
        super().__init__(spec, models_dir)
        self.model: Any = None
        self.processor: Any = None

    @classmethod
    def assets(cls, spec: ModelSpec) -> list[Asset]:
        return [spec.config.weights]

    @classmethod
    def presets(cls) -> list[ModelSpec]:
        return PRESETS

    @classmethod
    def handles_path(cls, path: Path) -> bool:
        return _is_blip_folder(path)

    @classmethod
    def spec_for_path(cls, path: Path, model_id: str | None = None, origin: str = "local file") -> ModelSpec:
        return ModelSpec(model_id or f"local:{path.name}", FAMILY, FuseCapConfig(folder_asset(path)),
                         DEFAULT_DECODING, f"BLIP captioner in {path}", origin)

    @classmethod
    def apply_overrides(cls, spec: ModelSpec, overrides: Mapping[str, Any]) -> ModelSpec:
        cls.check_override_keys(spec, overrides)
        location = overrides.get("weights")
        if not location:
            return spec
        path = Path(location).expanduser()
        if path.exists():
            if not path.is_dir():
                raise CaptionerError(f"FuseCap weights must be a folder (config.json, preprocessor files, weights); "
                                     f"{path} is a file.")
            asset = folder_asset(path)
        elif HUB_ID.match(location) and "/" in location:
            asset = hub_asset(location)
        else:
            raise CaptionerError(f"{location} is neither a folder nor a Hugging Face repo id.")
        return spec.with_config(weights=asset)

    @property
    def image_size(self) -> int | None:
        if self.processor is None:
            return None
        size = self.processor.image_processor.size  # a dict, or a SizeDict in transformers 5
        sides = [_size_field(size, name) for name in ("height", "width", "shortest_edge")]
        return min((s for s in sides if s), default=None)

    def _load(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

        folder = ensure_asset(self.spec.config.weights, self.models_dir)
        state = _read_weights(folder)
        config = BlipConfig.from_pretrained(str(folder))
        model, info = BlipForConditionalGeneration.from_pretrained(None, config=config, state_dict=state,
                                                                   output_loading_info=True)
        del state
        missing = sorted(set(info.get("missing_keys") or ()) - set(LEGACY_KEYS))
        if missing:
            raise CheckpointLayoutError(f"{folder} is not a BLIP captioner checkpoint: missing {', '.join(missing[:5])}.")
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        # generate() calls the model's _reorder_cache when it has one, in every supported version.
        self.model.text_decoder._reorder_cache = reorder_self_attention_only
        try:
            # The fast tokenizer drops BLIP's [DEC] id, which is outside the BERT vocabulary.
            self.processor = BlipProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise CaptionerError(f"Could not read the BLIP processor files in {folder}: {exc}") from exc
        if not getattr(self.processor.tokenizer, "is_fast", False):
            log.warning("No fast tokenizer for %s: captions may start with [UNK] (install 'tokenizers').", folder)

    def _release(self) -> None:
        self.model = self.processor = None

    def _move(self, device: torch.device) -> None:
        self.model.to(device)

    def preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        if self.processor is None:
            raise CaptionerError("Load the model before asking for its preprocessing.")
        return BlipPixels(self.processor.image_processor)

    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[str]:
        prompt = options.prompt or ""
        prompt_ids = self.processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
        batch = pixels.shape[0]
        input_ids = prompt_ids.repeat(batch, 1).to(self.device)  # generate overwrites column 0 with [DEC]
        kept = input_ids.shape[1] - 1  # [DEC] + prompt tokens; generate drops the trailing [SEP]
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels.to(self.device, self.dtype), input_ids=input_ids,
                                      attention_mask=torch.ones_like(input_ids),
                                      **self.generate_arguments(options, batch, kept))
        if not options.keep_prompt:
            out = out[:, kept:]  # the caption starts with its content, not with "a picture of"
        texts = self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def generate_arguments(self, options: DecodingOptions, batch: int, prompt_length: int) -> dict[str, Any]:
        args: dict[str, Any] = {"do_sample": False, "num_beams": 1}
        if options.max_new_tokens:
            args["max_new_tokens"] = options.max_new_tokens
        else:
            args["max_length"] = max(self.spec.config.max_length, prompt_length + 1)
        if options.min_new_tokens:
            args["min_new_tokens"] = options.min_new_tokens
        if options.repetition_penalty:
            args["repetition_penalty"] = options.repetition_penalty
        if options.strategy == "beam":
            args["num_beams"] = options.num_beams or 3
        elif options.strategy == "sample":
            sampler = RowSampler(row_generators(options.seed, [0] * batch), options.top_k, options.top_p or 1.0,
                                 options.temperature or 1.0)
            args["logits_processor"] = _processor_list(sampler)
        return args


def reorder_self_attention_only(past: Any, beam_idx: torch.Tensor) -> Any:
    """Beam search's cache reordering after each step, without the cross-attention part.

    Beams only ever take over beams of their own image, and every beam of an image holds the same
    cross-attention keys and values (the image's 577 tokens, computed once per beam): reordering
    them copies ~42 MB per beam per step for nothing, about half of the decoding time on a CPU.
    transformers 5 caches them in an EncoderDecoderCache; 4.x keeps only self-attention in tuples.
    """
    if hasattr(past, "self_attention_cache"):
        past.self_attention_cache.reorder_cache(beam_idx)
        return past
    return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past)


def _size_field(size: Any, name: str) -> int | None:
    try:
        value = size[name]
    except (KeyError, TypeError):
        value = getattr(size, name, None)
    return int(value) if value else None


def _processor_list(*processors):
    from transformers import LogitsProcessorList

    return LogitsProcessorList(processors)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights (safetensors first), with the tied pair complete."""
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise CaptionerError(f"No weights in {folder}: expected {' or '.join(WEIGHT_FILES)}.")
    state = load_state_dict(path)
    # transformers 4.x does not re-tie BLIP's decoder to the embeddings when one is missing.
    for key, twin in (TIED, TIED[::-1]):
        if key not in state and twin in state:
            state[key] = state[twin]
    return state


def _is_blip_folder(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("model_type") == "blip" and "BlipForConditionalGeneration" in data.get("architectures", [])
