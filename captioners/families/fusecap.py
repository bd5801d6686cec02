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
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from PIL import Image
from torch import nn

from captioners.base import Candidates, Captioner, ModelSpec
from captioners.errors import CaptionerError, CheckpointLayoutError
from captioners.options import DecodingOptions
from captioners.sampling import RowSampler, row_generators
from captioners.text import HUB_ID
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


CPU_VISION_CHUNK = 2  # images per vision-tower call on a CPU (see FuseCapCaptioner.encode_images)


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
        with quiet_model_building():
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

    def _preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        return BlipPixels(self.processor.image_processor)

    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[str]:
        return [group[0] for group in self._generate(pixels, options, 1, options.strategy or "beam")]

    def _candidates(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> Candidates:
        """The ``count`` best beams of each image's search, or ``count`` samples (stream j for sample j)."""
        return Candidates(self._generate(pixels, options, count, mode))

    def _generate(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> list[list[str]]:
        prompt = options.prompt or ""
        prompt_ids = self.processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
        batch = pixels.shape[0]
        # What BLIP's generate does, in every supported version: [DEC] replaces [CLS], the trailing
        # [SEP] goes. Done here so that the image encoding can be split (see encode_images).
        text_config = self.model.config.text_config
        input_ids = prompt_ids[:, :-1].repeat(batch, 1).to(self.device)
        input_ids[:, 0] = text_config.bos_token_id
        if count == 1:
            arguments = self.generate_arguments(options, batch, input_ids.shape[1])
            repeats = 1
        else:
            arguments = self.candidate_arguments(options, batch, input_ids.shape[1], count, mode)
            repeats = 1 if mode == "beam" else count
        rows_per_image = arguments["num_beams"] * repeats
        decoder = self.model.text_decoder
        with torch.inference_mode():
            image_embeds = self.encode_images(pixels.to(self.device, self.dtype, non_blocking=True))  # pinned
            if repeats > 1:  # samples: each image's row repeated, one sample stream per copy
                input_ids = input_ids.repeat_interleave(repeats, dim=0)
                image_embeds = image_embeds.repeat_interleave(repeats, dim=0)
            with cross_attention_projected_once(decoder, rows_per_image):
                out = decoder.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
                    eos_token_id=text_config.sep_token_id, pad_token_id=text_config.pad_token_id, **arguments)
        # Prompt and caption decoded together, as the model card prints them: decoding the new ids
        # alone would start a caption whose first token continues the prompt's last word with "##".
        texts = [text.strip() for text in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
        if not options.keep_prompt:
            decoded_prompt = self.processor.tokenizer.decode(input_ids[0], skip_special_tokens=True).strip()
            texts = [strip_prompt(text, decoded_prompt) for text in texts]
        return [texts[i:i + count] for i in range(0, len(texts), count)]

    def candidate_arguments(self, options: DecodingOptions, batch: int, prompt_length: int, count: int,
                            mode: str) -> dict[str, Any]:
        """generate() arguments for ``count`` candidates per image: the best ``count`` beams of a search at
        least that wide, or (``mode`` sample) one sampled row per candidate, row j of an image on stream j."""
        if mode == "beam":
            arguments = self.generate_arguments(options.replace(strategy="beam"), batch, prompt_length)
            arguments["num_beams"] = max(arguments["num_beams"], count)
            arguments["num_return_sequences"] = count
            return arguments
        arguments = self.generate_arguments(options.replace(strategy="greedy"), batch, prompt_length)
        streams = [j for _ in range(batch) for j in range(count)]
        sampler = RowSampler(row_generators(options.seed, streams), options.top_k, options.top_p or 1.0,
                             options.temperature or 1.0)
        arguments["logits_processor"] = _processor_list(sampler)
        return arguments

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's output tokens, a few images at a time on a CPU.

        ViT-B/16 at 384 px is compute-bound there: eight images at once take ~25% longer than
        two at a time (its 577-token attention no longer fits the caches). GPUs take the whole batch.
        """
        chunk = CPU_VISION_CHUNK if pixels.device.type == "cpu" else pixels.shape[0]
        return torch.cat([self.model.vision_model(pixel_values=part)[0] for part in pixels.split(chunk)])

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


class RepeatedRows:
    """How many consecutive rows of an encoder-states tensor are copies of one image, checked once.

    generate() repeats each image's states once per beam with ``repeat_interleave``; that is
    verified rather than assumed (one comparison per call, shared by all layers), so a transformers
    version that lays the rows out otherwise gets plain projections instead of wrong captions.
    """

    def __init__(self, expected: int):
        self.expected = expected
        self.source: torch.Tensor | None = None
        self.count = 1

    def of(self, states: torch.Tensor) -> int:
        if states is not self.source:
            self.source, self.count = states, 1
            rows = self.expected
            if rows > 1 and states.shape[0] % rows == 0:
                grouped = states.unflatten(0, (-1, rows))
                self.count = rows if bool((grouped == grouped[:, :1]).all()) else 1
        return self.count


class ProjectedOnce(nn.Module):
    """A cross-attention key or value projection that computes each image's result once per generate.

    generate() repeats every image's encoder states once per beam, and transformers 4.x projects
    them again at every step, for every beam: on a CPU that was most of FuseCap's decoding time.
    The input is the same tensor object at every step, so it is projected once, from one row per
    image, and the result reused while that object comes back.
    """

    def __init__(self, linear: nn.Linear, repeats: RepeatedRows):
        super().__init__()
        self.linear = linear
        self.repeats = repeats
        self.source: torch.Tensor | None = None  # held, so its id cannot be reused by another tensor
        self.result: torch.Tensor | None = None

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states is not self.source:
            rows = self.repeats.of(states)
            projected = self.linear(states[::rows])
            self.source, self.result = states, projected if rows == 1 else projected.repeat_interleave(rows, dim=0)
        return self.result


@contextmanager
def cross_attention_projected_once(decoder: nn.Module, rows_per_image: int) -> Iterator[None]:
    """Swap :class:`ProjectedOnce` into every cross-attention layer of a BLIP text decoder, for one call."""
    repeats = RepeatedRows(rows_per_image)
    swapped = []
    for layer in decoder.bert.encoder.layer:
        attention = layer.crossattention.self
        for name in ("key", "value"):
            linear = getattr(attention, name)
            # Another thread's call may have its wrapper in place: wrap (and later restore) the plain module.
            linear = linear.linear if isinstance(linear, ProjectedOnce) else linear
            setattr(attention, name, ProjectedOnce(linear, repeats))
            swapped.append((attention, name, linear))
    try:
        yield
    finally:  # the plain modules go back, with no reference left to this call's tensors
        for attention, name, linear in swapped:
            setattr(attention, name, linear)


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
