"""FuseCap: a BLIP-base captioner trained on fused, enriched captions (noamrot/FuseCap).

Runs through transformers' ``BlipForConditionalGeneration`` and ``BlipProcessor``. Weights are read
by :func:`captioners.weights.load_state_dict` (safetensors preferred, ``.bin`` only with
``weights_only=True``) and handed to ``from_pretrained`` as a state dict, so no transformers
version ever unpickles them freely.

Captions are decoded by :mod:`captioners.blip_decoder`, our own loop over the loaded model's text
decoder (each image's cross-attention keys and values computed once, shared by its beams), which
gives ``BlipForConditionalGeneration.generate``'s tokens without calling it. Its settings are always
explicit: transformers 4.x took FuseCap's ``num_beams 3`` / ``max_length 60`` from the text config,
5.x ignores them there (greedy, 20 new tokens).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from captioners.base import Candidates, Captioner, ModelSpec
from captioners.blip_decoder import DecodeSettings, Sampling, check_text_decoder, decode_captions
from captioners.errors import CaptionerError, CheckpointLayoutError
from captioners.options import DecodingOptions
from captioners.tensor_preprocess import TensorPreprocess
from captioners.text import HUB_ID
from captioners.vit_encoder import OwnBlipVisionForward, blip_unsupported_reason
from captioners.weights import Asset, ensure_asset, load_state_dict, quiet_model_building

log = logging.getLogger(__name__)

FAMILY = "fusecap"
FOLDER = "fusecap"
REPO_ID = "noamrot/FuseCap"
# The model card is served under both ids; they hold the same files, so they share one folder.
SAME_MODEL = {"noamrot/fusecap", "noamrot/fusecap_image_captioning"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Alternatives of one required group (see REQUIRED) are fetched until one arrives: noamrot/FuseCap's files first.
REPO_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "vocab.txt", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", *WEIGHT_FILES)
# transformers 5 saves processor_config.json where older versions (and the hub repo) have preprocessor_config.json,
# and tokenizer.json without vocab.txt: BlipProcessor loads (a fast tokenizer) from either, in every supported version.
REQUIRED = ("config.json", "preprocessor_config.json|processor_config.json", "vocab.txt|tokenizer.json",
            "|".join(WEIGHT_FILES))

# A buffer, persistent in transformers 4.30 (so saved and expected then) and not since: optional both ways.
LEGACY_KEYS = ("text_decoder.bert.embeddings.position_ids",)
# The output projection shares its matrix with the word embeddings; files may hold only one of them.
TIED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight")


# Images per vision-tower call on a CPU: with our forward, 1, 4 and 8 at a time ran within 3% of each
# other (bench_encoder.py --arch blip-vit-b16-384), so one at a time, the least memory.
CPU_VISION_CHUNK = 1


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


def blip_tensor_preprocess(processor: Any) -> TensorPreprocess | None:
    """BlipImageProcessor's steps (RGB, resize to a fixed size with PIL's bicubic, rescale by 1/255,
    normalize) as tensor operations, or None for settings it does not cover."""
    size = {key: (processor.size.get(key) if isinstance(processor.size, dict) else getattr(processor.size, key, None))
            for key in ("height", "width")}
    bicubic = int(getattr(processor, "resample", 3)) == 3  # PIL.Image.BICUBIC
    if not (processor.do_resize and size.get("height") and size.get("width") and bicubic and processor.do_rescale
            and abs(processor.rescale_factor - 1 / 255) < 1e-9 and processor.do_normalize):
        return None
    return TensorPreprocess((int(size["height"]), int(size["width"])), tuple(processor.image_mean),
                            tuple(processor.image_std))


class FuseCapCaptioner(Captioner):
    family = FAMILY
    override_keys = ("weights",)

    def __init__(self, spec: ModelSpec, models_dir: Path):
        super().__init__(spec, models_dir)
        self.model: Any = None
        self.processor: Any = None
        self.own_vision: OwnBlipVisionForward | None = None  # our forward of the vision tower (CPU)

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
        with quiet_model_building():
            model, info = BlipForConditionalGeneration.from_pretrained(None, config=config, state_dict=state,
                                                                       output_loading_info=True)
        del state
        missing = sorted(set(info.get("missing_keys") or ()) - set(LEGACY_KEYS))
        if missing:
            raise CheckpointLayoutError(f"{folder} is not a BLIP captioner checkpoint: missing {', '.join(missing[:5])}.")
        try:
            check_text_decoder(model.text_decoder)
        except ValueError as exc:
            raise CheckpointLayoutError(f"{folder}: {exc}") from exc
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        vision = self.model.vision_model
        self.own_vision = OwnBlipVisionForward(vision) if blip_unsupported_reason(vision) is None else None
        try:
            # The fast tokenizer drops BLIP's [DEC] id, which is outside the BERT vocabulary.
            self.processor = BlipProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise CaptionerError(f"Could not read the BLIP processor files in {folder}: {exc}") from exc
        if not getattr(self.processor.tokenizer, "is_fast", False):
            log.warning("No fast tokenizer for %s: captions may start with [UNK] (install 'tokenizers').", folder)

    def _release(self) -> None:
        self.model = self.processor = self.own_vision = None

    def _move(self, device: torch.device) -> None:
        self.model.to(device)

    def _preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        return BlipPixels(self.processor.image_processor)

    def _tensor_preprocessor(self) -> TensorPreprocess | None:
        return blip_tensor_preprocess(self.processor.image_processor)

    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[str]:
        return [group[0] for group in self._generate(pixels, options, 1, options.strategy or "beam")]

    def _candidates(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> Candidates:
        """The ``count`` best beams of each image's search, or ``count`` samples (stream j for sample j)."""
        return Candidates(self._generate(pixels, options, count, mode))

    def _generate(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> list[list[str]]:
        tokenizer = self.processor.tokenizer
        # What BLIP's generate does to the prompt, in every supported version: [DEC] replaces [CLS],
        # the trailing [SEP] goes.
        prompt = tokenizer(options.prompt or "", return_tensors="pt")["input_ids"][0, :-1].to(self.device)
        prompt[0] = self.model.config.text_config.bos_token_id
        settings = self.decode_settings(options, len(prompt), count, mode)
        with torch.inference_mode():
            image_embeds = self.encode_images(pixels.to(self.device, self.dtype, non_blocking=True))  # pinned
            groups = decode_captions(self.model.text_decoder, image_embeds, prompt, settings)
        # Prompt and caption decoded together, as the model card prints them: decoding the new ids
        # alone would start a caption whose first token continues the prompt's last word with "##".
        texts = [text.strip() for text in tokenizer.batch_decode([ids for group in groups for ids in group],
                                                                 skip_special_tokens=True)]
        if not options.keep_prompt:
            decoded_prompt = tokenizer.decode(prompt, skip_special_tokens=True).strip()
            texts = [strip_prompt(text, decoded_prompt) for text in texts]
        return [texts[i:i + count] for i in range(0, len(texts), count)]

    def decode_settings(self, options: DecodingOptions, prompt_length: int, count: int = 1,
                        mode: str = "beam") -> DecodeSettings:
        """What to decode. ``count`` 1: one caption per image by ``options.strategy`` (beam, sample,
        otherwise greedy). More: the ``count`` best beams of a search at least that wide, or
        (``mode`` sample) ``count`` sampled rows per image, row j of an image on sample stream j."""
        strategy = options.strategy if count == 1 else ("beam" if mode == "beam" else "sample")
        if options.max_new_tokens:
            max_length = prompt_length + options.max_new_tokens
        else:
            max_length = max(self.spec.config.max_length, prompt_length + 1)
        beams, sampling = 1, None
        if strategy == "beam":
            beams = max(options.num_beams or 3, count)
        elif strategy == "sample":
            sampling = Sampling(options.seed, options.top_k, options.top_p or 1.0, options.temperature or 1.0)
        text_config = self.model.config.text_config
        return DecodeSettings(max_length=max_length, eos=text_config.sep_token_id, pad=text_config.pad_token_id,
                              num_beams=beams, per_image=count, min_new_tokens=options.min_new_tokens or 0,
                              repetition_penalty=options.repetition_penalty or None, sampling=sampling)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's output tokens: on a CPU through our own forward (captioners/vit_encoder.py,
        the same tokens to fp32 rounding), ``CPU_VISION_CHUNK`` images at a time; GPUs take the whole
        batch through transformers' forward."""
        vision = self.model.vision_model
        if pixels.device.type != "cpu":
            return vision(pixel_values=pixels)[0]
        encode = self.own_vision or (lambda part: vision(pixel_values=part)[0])
        return torch.cat([encode(part) for part in pixels.split(CPU_VISION_CHUNK)])


WORD_END = re.compile(r"\S*\Z")  # the (maybe empty) word that a string ends with


def strip_prompt(text: str, prompt: str) -> str:
    """The caption in ``text`` (prompt and caption decoded together) without the decoded ``prompt``.

    The caption starts where ``text`` stops agreeing with ``prompt``, at a word boundary: when the
    first generated token continued the prompt's last word ("a picture of" + "##s" decodes to
    "a picture ofs"), or decoding changed the text inside the prompt, the caption starts with that
    whole word ("ofs ...") rather than with a piece of it.
    """
    cut = len(os.path.commonprefix([text, prompt]))
    inside_a_word = 0 < cut < len(text) and text[cut - 1].isalnum() and text[cut].isalnum()
    if cut < len(prompt) or inside_a_word:
        cut = WORD_END.search(text, 0, cut).start()  # back to the start of the word being cut
    return text[cut:].strip()


def _size_field(size: Any, name: str) -> int | None:
    try:
        value = size[name]
    except (KeyError, TypeError):
        value = getattr(size, name, None)
    return int(value) if value else None


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
