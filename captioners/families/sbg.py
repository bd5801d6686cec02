"""SBG, "Selective Blind Guessing" (Anshler's ICG): keywords chosen by CLIP, a caption guessed by GPT-2.

CLIP picks keywords from a fixed vocabulary (:mod:`captioners.families.sbg_keywords`); a GPT-2
fine-tuned on ``"kw1, kw2, ... ### caption"`` writes several captions from them without seeing the
image; CLIP keeps the one closest to the image. Same steps and output as the ICG extension, but
label features are cached on disk, images are encoded in batches, every candidate of every image
is sampled in one KV-cached decoding pass (each prompt run once), and GPT-2 runs on CLIP's device.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from captioners.base import Candidates, Captioner, ModelSpec
from captioners.clip_backbone import ClipBackbone, ClipSpec, clip_assets, load_clip
from captioners.errors import CaptionerError, CheckpointLayoutError
from captioners.families.clip_prefix import _clip_image_size
from captioners.families.sbg_keywords import (LabelSets, TextFeatureStore, Vocabulary, prompt_for, rank,
                                              read_vocabulary_file, select_keywords)
from captioners.options import DecodingOptions
from captioners.prefix_decoding import decode_prompts, greedy_chooser, sampling_chooser
from captioners.text import GPT2_TOKENIZER, load_gpt2_tokenizer, tokenizer_asset
from captioners.weights import WEIGHT_SUFFIXES, Asset, ensure_asset, load_state_dict, quiet_model_building

log = logging.getLogger(__name__)

FAMILY = "sbg"
FOLDER = "sbg"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ICG_COMMIT = "dc0668edb47028a12641947d91bbab3f51c0b3c5"  # Anshler/ICG_sd_extension, 2023-12-30
ICG_RAW = f"https://raw.githubusercontent.com/Anshler/ICG_sd_extension/{ICG_COMMIT}/scripts"
LABELS_FILE, ENCYCLOPEDIA_FILE = "all_labels.pkl", "encyclopedia.pkl"
SEPARATOR = "###"
# Causal-mask buffers that transformers < 4.30 saved with GPT-2; not weights.
LEGACY_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _weights_folder(path: str, repo_id: str | None = None) -> Asset:
    return Asset(path, repo_id=repo_id, repo_files=("config.json", "generation_config.json", *WEIGHT_FILES),
                 is_dir=True, required=("|".join(WEIGHT_FILES),))


def _weights_asset(location: Path) -> Asset:
    path = location.expanduser().resolve()
    return _weights_folder(str(path)) if path.is_dir() or not path.suffix else Asset(str(path))


def _vocabulary_file(name: str, folder: str | None = None) -> Asset:
    if folder is None:
        return Asset(f"{FOLDER}/{name}", file_url=f"{ICG_RAW}/{name}", converted_suffix=".json", option="--vocabulary")
    return Asset(str(Path(folder).expanduser().resolve() / name), converted_suffix=".json", option="--vocabulary")


@dataclass(frozen=True)
class SbgConfig:
    weights: Asset
    labels: Asset = _vocabulary_file(LABELS_FILE)
    encyclopedia: Asset = _vocabulary_file(ENCYCLOPEDIA_FILE)
    clip: ClipSpec = ClipSpec("ViT-L-14", "openai", quick_gelu=True)  # OpenAI's, trained with QuickGELU
    tokenizer: Asset = GPT2_TOKENIZER
    keywords: int = 1000     # most frequent NOUN/ADV/ADJ labels used as keyword vocabulary
    max_length: int = 256    # prompt + caption tokens, as the original generation call


# The original sampled with transformers' defaults (top-k 50, temperature 1) and kept the best of 5.
DEFAULT_DECODING = DecodingOptions(strategy="sample", num_candidates=5, top_k=50, top_p=1.0, temperature=1.0)

PRESETS = [ModelSpec(
    "sbg-flickr8k", FAMILY,
    SbgConfig(_weights_folder(f"{FOLDER}/selective-blind-guessing", "Anshler/selective-blind-guessing")),
    DEFAULT_DECODING,
    "ICG Selective Blind Guessing, Flickr8k: CLIP keywords -> GPT-2 guesses -> CLIP picks (ViT-L-14)")]


class SbgCaptioner(Captioner):
    family = FAMILY
    override_keys = ("weights", "clip_arch", "clip_weights", "clip_config", "tokenizer", "vocabulary")

    def __init__(self, spec: ModelSpec, models_dir: Path):
        super().__init__(spec, models_dir)
        self.gpt: Any = None
        self.tokenizer: Any = None
        self.clip: ClipBackbone | None = None
        self.sets: LabelSets | None = None
        self.store: TextFeatureStore | None = None

    @classmethod
    def assets(cls, spec: ModelSpec) -> list[Asset]:
        config: SbgConfig = spec.config
        return [config.weights, config.tokenizer, config.labels, config.encyclopedia, *clip_assets(config.clip)]

    @classmethod
    def presets(cls) -> list[ModelSpec]:
        return PRESETS

    @classmethod
    def spec_for_path(cls, path: Path, model_id: str | None = None, origin: str = "local file") -> ModelSpec:
        """An SBG GPT-2 folder or weights file (a preset with "family": "sbg"); the other files
        are the sbg-flickr8k ones unless the preset overrides them."""
        return ModelSpec(model_id or f"local:{path.name}", FAMILY, SbgConfig(_weights_asset(path)), DEFAULT_DECODING,
                         f"SBG GPT-2 in {path}", origin)

    @classmethod
    def apply_overrides(cls, spec: ModelSpec, overrides: Mapping[str, Any]) -> ModelSpec:
        cls.check_override_keys(spec, overrides)
        config: SbgConfig = spec.config
        changes: dict[str, Any] = {}
        if overrides.get("weights"):
            changes["weights"] = _weights_asset(Path(overrides["weights"]))
        if overrides.get("tokenizer"):
            changes["tokenizer"] = tokenizer_asset(overrides["tokenizer"])
        if overrides.get("vocabulary"):
            changes["labels"] = _vocabulary_file(LABELS_FILE, overrides["vocabulary"])
            changes["encyclopedia"] = _vocabulary_file(ENCYCLOPEDIA_FILE, overrides["vocabulary"])
        changes["clip"] = config.clip.with_overrides(overrides)
        return replace(spec, config=replace(config, **changes))

    @property
    def image_size(self) -> int | None:
        return _clip_image_size(self.clip) if self.clip else None

    # ---- loading --------------------------------------------------------------------------------
    def _load(self, device: torch.device, dtype: torch.dtype) -> None:
        config: SbgConfig = self.spec.config
        vocabulary = Vocabulary(self._vocabulary_data(config.labels), self._vocabulary_data(config.encyclopedia),
                                config.keywords, source=str(config.labels.path(self.models_dir).parent))
        self.tokenizer = load_gpt2_tokenizer(ensure_asset(config.tokenizer, self.models_dir))
        gpt = load_gpt2(ensure_asset(config.weights, self.models_dir))
        if len(self.tokenizer) > gpt.config.vocab_size:
            raise CaptionerError(f"Tokenizer has {len(self.tokenizer)} tokens but the GPT-2 only "
                                 f"{gpt.config.vocab_size}: use the tokenizer the model was trained with.")
        self.gpt = gpt.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.clip = load_clip(config.clip, self.models_dir, device, dtype)
        self.sets = LabelSets(vocabulary)
        key = f"{clip_fingerprint(config.clip)}|{str(dtype).removeprefix('torch.')}|{vocabulary.digest}"
        name = f"{re.sub(r'[^A-Za-z0-9.-]+', '_', Path(config.clip.config or config.clip.arch).stem)}-" \
               f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        self.store = TextFeatureStore(self.clip.encode_texts, self.models_dir / FOLDER / "text_features" / name, key)
        self.store.to(device)

    def _vocabulary_data(self, asset: Asset) -> Any:
        path = ensure_asset(asset, self.models_dir)
        inside_models_dir = path.resolve().is_relative_to(self.models_dir.resolve())
        return read_vocabulary_file(path, convert=inside_models_dir)

    def _release(self) -> None:
        if self.store is not None:
            self.store.save()
        self.gpt = self.tokenizer = self.clip = self.sets = self.store = None

    def _move(self, device: torch.device) -> None:
        self.gpt.to(device)
        self.clip.to(device)
        self.store.to(device)

    def _preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.clip.preprocess

    # ---- captioning -------------------------------------------------------------------------------
    def caption_pixels(self, pixels: torch.Tensor, options: DecodingOptions) -> list[str]:
        return [group[0] for group in self._plain_candidates(pixels, options).texts]

    def _plain_candidates(self, pixels: torch.Tensor, options: DecodingOptions) -> Candidates:
        count = 1 if options.strategy == "greedy" else options.num_candidates or 5
        return self._guesses(pixels, options, count, keep=1)

    def _candidates(self, pixels: torch.Tensor, options: DecodingOptions, count: int, mode: str) -> Candidates:
        if mode == "beam" or options.strategy == "greedy":
            raise CaptionerError("SBG samples its candidates: use candidates sample (--candidates sample) with "
                                 "strategy sample.")
        return self._guesses(pixels, options, count, keep=count)

    def _guesses(self, pixels: torch.Tensor, options: DecodingOptions, count: int, keep: int) -> Candidates:
        """``count`` guesses per image, ranked by CLIP as the original's 'validation'; the ``keep`` best."""
        images = self.clip.encode_images(pixels, normalize=True)
        self.store.features(self.sets.fixed_labels())  # one encoding pass for labels every image needs
        prompts = [prompt_for(select_keywords(image, self.sets, self.store.features)) for image in images]
        self.store.save()
        texts = self.generate(prompts, count, options)
        candidates = [[parse_caption(t) for t in texts[i * count:(i + 1) * count]] for i in range(len(prompts))]
        ranked = self.ranked(images, candidates)
        if options.postprocess is False:  # the guesses as generated, without the Flickr clean-up
            ranked = [[after_separator(texts[i * count + group.index(pick)]).strip() for pick in order]
                      for i, (group, order) in enumerate(zip(candidates, ranked))]
        return Candidates([order[:keep] for order in ranked], images, self.clip)

    def choose(self, images: torch.Tensor, candidates: list[list[str]]) -> list[str]:
        """Per image, the candidate CLIP finds closest to it (the original's 'validation')."""
        return [order[0] for order in self.ranked(images, candidates)]

    def ranked(self, images: torch.Tensor, candidates: list[list[str]]) -> list[list[str]]:
        """Per image, its candidates closest to it first by CLIP (a repeated guess counts once)."""
        if len(candidates[0]) == 1:
            return [list(group) for group in candidates]
        features = self.clip.encode_texts([text for group in candidates for text in group])  # one pass
        count = len(candidates[0])
        return [[text for text, _ in rank(image, group, lambda _, i=i: features[i * count:(i + 1) * count])]
                for i, (image, group) in enumerate(zip(images, candidates))]

    def generate(self, prompts: list[str], count: int, options: DecodingOptions) -> list[str]:
        """``count`` continuations of every prompt (prompt-major), decoded with their prompt.

        Decoded by :func:`decode_prompts`, our own KV-cached loop, which chooses what transformers'
        ``generate`` chose here before (greedy, or one seeded draw per row and step, after the
        repetition penalty) on any transformers version. Candidate j of every image samples from
        stream j of the seed."""
        if options.strategy not in (None, "sample", "greedy"):
            raise CaptionerError("SBG samples its captions: use --strategy sample (the default) or greedy.")
        eos = self.tokenizer.eos_token_id
        encoded = [self.tokenizer.encode(prompt) for prompt in prompts]
        width = max(len(ids) for ids in encoded)
        n_positions = self.gpt.config.n_positions
        if width >= n_positions:
            raise CaptionerError(f"An SBG prompt has {width} tokens; this GPT-2 takes at most {n_positions - 1}.")
        # Each row may grow to max_length tokens in all, as the original generation call allowed;
        # the longest prompt's positions cap every row (the cache holds width + new tokens).
        wanted, room = options.max_new_tokens or n_positions, n_positions - width
        limits = [min(max(1, min(self.spec.config.max_length - len(ids), wanted)), room) for ids in encoded]
        if options.strategy == "greedy":
            choose = greedy_chooser()
        else:
            streams = [j for _ in prompts for j in range(count)]  # candidate j of every image: stream j
            choose = sampling_chooser(options.temperature or 1.0, options.top_p or 1.0, options.top_k, options.seed,
                                      len(streams), streams)
        new_tokens = decode_prompts(self.gpt, encoded, count, eos, limits, choose, options.repetition_penalty,
                                    static=self.static_decoding(self.gpt.transformer.wte.weight))
        texts = []
        for row, new in enumerate(new_tokens):
            if eos in new:
                new = new[:new.index(eos)]
            texts.append(decode_like_the_pipeline(self.tokenizer, encoded[row // count] + new))
        return texts


# The English clean-up that transformers 4.x's text-generation pipeline applied to the ICG
# extension's output ("a dog 's ball , grass" -> "a dog's ball, grass"). transformers 5 skips it
# for GPT-2's tokenizer, so it is done here: the same captions under every version.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def decode_like_the_pipeline(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


def after_separator(text: str) -> str:
    parts = text.split(SEPARATOR)
    return parts[1] if len(parts) > 1 else ""


def parse_caption(text: str) -> str:
    """The guess after '###', up to its first '.', Flickr style: 'a dog runs on the grass .'."""
    return after_separator(text).strip().split(".")[0].strip() + " ."


def load_gpt2(location: Path) -> Any:
    """GPT2LMHeadModel from a folder (config.json optional) or a weights file, read safely."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = location if location.is_dir() else location.parent
    weights = location if location.is_file() else next(
        (location / name for name in WEIGHT_FILES if (location / name).is_file()), None)
    if weights is None or weights.suffix not in WEIGHT_SUFFIXES:
        raise CaptionerError(f"No GPT-2 weights in {location}: expected {' or '.join(WEIGHT_FILES)}.")
    state = {k.removeprefix("gpt."): v for k, v in load_state_dict(weights).items() if not LEGACY_BUFFER.match(k)}
    if "transformer.wte.weight" not in state:
        raise CheckpointLayoutError(f"{weights} is not a GPT-2 language model (no transformer.wte.weight).")
    if (folder / "config.json").is_file():
        config = GPT2Config.from_pretrained(str(folder))
    else:
        config = _config_from_shapes(state)
    with quiet_model_building():
        model, info = GPT2LMHeadModel.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    missing = sorted(set(info.get("missing_keys") or ()) - {"lm_head.weight"})
    if missing:
        raise CheckpointLayoutError(f"{weights} does not fit its GPT-2 config: missing {', '.join(missing[:5])}.")
    return model


def _config_from_shapes(state: Mapping[str, torch.Tensor]) -> Any:
    """GPT-2 small's settings with the sizes the weights show (no config.json beside them)."""
    from transformers import GPT2Config

    vocab, n_embd = state["transformer.wte.weight"].shape
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    return GPT2Config(vocab_size=vocab, n_embd=n_embd, n_head=max(1, n_embd // 64), n_layer=len(layers),
                      n_positions=state["transformer.wpe.weight"].shape[0], bos_token_id=vocab - 1,
                      eos_token_id=vocab - 1)


def clip_fingerprint(spec: ClipSpec) -> str:
    """What identifies a CLIP's text features: architecture, weights (tag, or file and its version)."""
    parts = [spec.arch, f"quick_gelu={spec.quick_gelu}"]
    if spec.weights_is_file():
        path = Path(spec.weights).expanduser()
        stat = path.stat() if path.is_file() else None
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else str(path))
    else:
        parts.append(spec.weights)
    if spec.config:
        config = Path(spec.config)
        parts.append(hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else str(config))
    return "|".join(parts)
