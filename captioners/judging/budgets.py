"""Token budgets of the text encoders a caption is trained for: CLIP's (SD 1.x/2.x/XL) and T5's (Flux, SD3).

CLIP tokens are counted with open_clip's BPE tokenizer (shipped with open_clip, no download); T5
tokens with T5's SentencePiece vocabulary, which T5 v1.1 (the encoder of Flux and SD3) shares with
the original T5: ``tokenizer.json`` from google-t5/t5-base, downloaded once into
``<models>/t5-tokenizer/`` like every model file (``python -m captioners download t5-tokenizer``
is not needed: the first run with ``--t5-max-tokens`` fetches it, or copy it there by hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from captioners.errors import CaptionerError
from captioners.weights import Asset, ensure_assets

T5_TOKENIZER = Asset("t5-tokenizer", repo_id="google-t5/t5-base", repo_files=("tokenizer.json",), is_dir=True,
                     required=("tokenizer.json",), option="--t5-tokenizer")


def t5_token_counter(models_dir: Path, asset: Asset = T5_TOKENIZER) -> Callable[[str], int]:
    """Counts T5 tokens of a text, without the closing </s> (budgets count the caption itself)."""
    from tokenizers import Tokenizer

    folder = ensure_assets([asset], models_dir, model="the T5 token budget")[0]
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # a damaged or foreign file: say which, not a Rust panic message alone
        raise CaptionerError(f"Could not read a T5 tokenizer from {folder / 'tokenizer.json'}: {exc}") from exc
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
