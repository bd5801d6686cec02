"""A tiny random BLIP captioner saved like noamrot/FuseCap (checkpoint-formats.md, sections 3 and 5C).

``save_pretrained`` of ``BlipForConditionalGeneration`` together with a ``BlipProcessor`` gives the
published key prefixes (``vision_model.*``, ``text_decoder.bert.*``, ``text_decoder.cls.predictions.*``)
and processor files. As in the real model, the decoder's bos id ([DEC]) lies just past the BERT
vocabulary, so the tokenizer does not know it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from tests.tiny_models import CAPTION_WORDS

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LEGACY_POSITION_IDS = "text_decoder.bert.embeddings.position_ids"
TIED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight")


def build_vocab(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """BERT-style vocabulary of the caption words; ``extra`` tokens (e.g. WordPiece ``##s``) go last,
    so that the ids of all other tokens stay the same."""
    words = sorted(set(CAPTION_WORDS.replace(".", " ").split()) | {"picture", "of", "photo"})
    path = folder / "vocab.txt"
    path.write_text("\n".join((*SPECIALS, ".", ",", *words, *extra)) + "\n", encoding="utf-8")
    return path


def reinitialize(model: torch.nn.Module, seed: int, std: float = 0.4) -> None:
    """Our own seeded weights: transformers versions initialise in different orders, and the tests
    should see the same tiny model under every pin set."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name.lower():
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def build_blip(folder: Path, seed: int = 0, sep_scale: float = 3.0, weights: str = "safetensors",
               biased: Mapping[str, float] | None = None):
    """Save a tiny FuseCap-like folder and return the model.

    ``weights``: ``safetensors`` (what save_pretrained writes), ``legacy`` (safetensors plus the
    ``position_ids`` buffer older transformers saved) or ``bin`` (a ``pytorch_model.bin`` holding
    both tied matrices and ``position_ids``, like the 2023 upload). ``sep_scale`` makes [SEP] likely
    enough that some captions end before the length limit. ``biased`` adds tokens (such as the
    WordPiece continuation ``##s``) to the vocabulary, each with that much added to its output bias.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    biased = dict(biased or {})
    tokenizer = BertTokenizer(str(build_vocab(folder, tuple(biased))))
    vocab = len(tokenizer)
    sep = tokenizer.convert_tokens_to_ids("[SEP]")
    config = BlipConfig(
        text_config=dict(vocab_size=vocab + 2, hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                         bos_token_id=vocab, sep_token_id=sep, pad_token_id=0, initializer_range=0.2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.2),
        projection_dim=32)
    model = BlipForConditionalGeneration(config).eval()
    reinitialize(model, seed)
    predictions, embeddings = model.text_decoder.cls.predictions, model.text_decoder.bert.embeddings
    with torch.no_grad():
        predictions.bias[sep] += sep_scale
        for token, bias in biased.items():
            predictions.bias[tokenizer.convert_tokens_to_ids(token)] += bias
        # FuseCap's output matrix equals its word embeddings (transformers 4.x leaves them untied).
        predictions.decoder.weight.copy_(embeddings.word_embeddings.weight)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(str(folder))
    model.save_pretrained(str(folder), safe_serialization=True)
    if weights != "safetensors":
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        positions = torch.arange(config.text_config.max_position_embeddings).unsqueeze(0)
        if weights == "legacy":
            state[LEGACY_POSITION_IDS] = positions
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        elif weights == "bin":
            full = dict(model.state_dict())
            full[TIED[0]] = full[TIED[1]]  # one storage for both, as in the 2023 file
            full[LEGACY_POSITION_IDS] = positions
            torch.save(full, folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
        else:
            raise ValueError(weights)
    return model
