"""The GPT-2 tokenizer, from the models folder (downloaded once from the hub) or a local folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from captioners.errors import CaptionerError
from captioners.weights import Asset

GPT2_TOKENIZER = Asset(
    "gpt2-tokenizer", repo_id="openai-community/gpt2",
    repo_files=("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"),
    is_dir=True, required=("vocab.json", "merges.txt"), option="--tokenizer")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def tokenizer_asset(location: str) -> Asset:
    """A local tokenizer folder, or a hub repo id holding GPT-2 tokenizer files."""
    path = Path(location).expanduser()
    if path.exists() or not HUB_ID.match(location):
        return Asset(str(path.resolve()), is_dir=True, required=GPT2_TOKENIZER.required, option="--tokenizer")
    safe_name = location.replace("/", "--")
    return Asset(f"tokenizers/{safe_name}", repo_id=location, repo_files=GPT2_TOKENIZER.repo_files,
                 is_dir=True, required=GPT2_TOKENIZER.required, option="--tokenizer")


def load_gpt2_tokenizer(folder: Path) -> Any:
    from transformers import GPT2TokenizerFast

    try:
        return GPT2TokenizerFast.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"Could not read a GPT-2 tokenizer from {folder}: {exc}") from exc
