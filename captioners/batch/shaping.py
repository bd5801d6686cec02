"""Caption text edits (prefix, trigger word, excluded words, regex replacements) and tag merging."""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from typing import Callable

from captioners.batch.job import TextShaping, TriggerMode

log = logging.getLogger(__name__)


def shape_caption(text: str, shaping: TextShaping) -> str:
    """Apply ``shaping`` in its documented order, after making the text one clean line."""
    text = one_line(text)
    if shaping.strip_period:
        text = re.sub(r"\s*\.\s*$", "", text)
    if shaping.lowercase:
        text = text.lower()
    for pattern, replacement in shaping.replacements:
        text = re.sub(pattern, replacement, text)
    excluded = _words_pattern(shaping.exclude)
    if excluded:
        text = tidy(excluded.sub("", text))
    if shaping.trigger:
        text = _add_trigger(text, shaping)
    return (shaping.prefix + text + shaping.suffix).strip()


def one_line(text: str) -> str:
    """A caption file holds one line: line breaks and tabs become spaces, control characters go."""
    text = "".join(" " if c.isspace() else c for c in text if c.isspace() or unicodedata.category(c) != "Cc")
    return re.sub(r" {2,}", " ", text).strip()


def _words_pattern(words: list[str]) -> re.Pattern[str] | None:
    """Whole words / phrases, case-insensitive; longest first so 'red shirt' wins over 'red'."""
    alternatives = sorted((re.escape(w.strip()) for w in words if w.strip()), key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _add_trigger(text: str, shaping: TextShaping) -> str:
    trigger = shaping.trigger.strip()
    if shaping.trigger_mode == TriggerMode.REPLACE:
        pattern = _words_pattern(shaping.class_words)
        replaced, count = pattern.subn(lambda _: trigger, text) if pattern else (text, 0)
        if count:
            return replaced
    if re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", text, re.IGNORECASE):
        return text
    return f"{trigger}, {text}" if text else trigger


def tidy(text: str) -> str:
    """What removing words leaves behind: double spaces, empty comma items, edge commas."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)   # "a, , b" -> "a, b"
    text = re.sub(r" +,", ",", text)            # "a , b" -> "a, b"
    return re.sub(r"^[\s,]+|[\s,]+$", "", text)


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def merge_texts(old: str, new: str, separator: str, dedupe_tags: bool, new_first: bool) -> str:
    """An existing caption and a new one joined by ``separator`` (new first for prepend).

    With ``dedupe_tags`` the new caption's comma-separated tags that the old one already holds
    (case-insensitively) are dropped; the old caption is never edited.
    """
    old, new = old.strip(), new.strip()
    if dedupe_tags and old and new:
        have = {t.casefold() for t in split_tags(old)}
        kept = []
        for tag in split_tags(new):
            if tag.casefold() not in have:
                have.add(tag.casefold())
                kept.append(tag)
        new = ", ".join(kept) if "," in new else (new if kept else "")
    if not old or not new:
        return old or new
    return new + separator + old if new_first else old + separator + new


@functools.cache
def clip_token_counter() -> Callable[[str], int]:
    """Counts CLIP BPE tokens (what SD's text encoder sees; 75 fit in one chunk). Made once per
    process: reading the BPE vocabulary takes ~0.1 s, and every API call and tab caption counts."""
    try:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer()
        return lambda text: len(tokenizer.encode(text))
    except Exception as exc:  # an open_clip without the class: a rough count still warns usefully
        log.debug("CLIP tokenizer unavailable (%s); counting words and punctuation instead", exc)
        return lambda text: len(re.findall(r"\w+|[^\w\s]", text))
