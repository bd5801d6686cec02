"""Quality gates for generated captions: cheap text checks that catch degenerate captions.

People who build LoRA training sets lose whole runs to a few broken captions (empty output, decoder
loops, captions the text encoder silently truncates). Every caption is checked here and each problem
becomes a `Flag`, so the batch summary can count them and the user can look at the bad files first.

Pure text: no torch import, token counting is injected by the caller (`TokenCounter`).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GATE_CODES = ("empty", "short", "repetition", "over_budget", "over_t5_budget", "low_score")

TokenCounter = Callable[[str], int]

WORD = re.compile(r"\w+")
# '.', '!', '?', ';' followed by whitespace or the end of the text.
SENTENCE_END = re.compile(r"[.!?;](?=\s|$)")
# A comma, unless it sits inside a number such as "1,000" (cutting there would split the number).
COMMA = re.compile(r"(?<!\d),|,(?!\d)")
# Left at the end of a cut, these read as an unfinished caption; whole words never end with them.
DANGLING = " \t\r\n,;:-([{/&"
MAX_NGRAM = 4


@dataclass(frozen=True)
class Flag:
    """One problem found in one caption."""

    code: str  # one of GATE_CODES
    message: str  # one short human sentence

    def __post_init__(self) -> None:
        # An unknown code would silently vanish from the batch summary, so refuse it early.
        if self.code not in GATE_CODES:
            raise ValueError(f"unknown gate code {self.code!r}; expected one of {', '.join(GATE_CODES)}")


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gates; the defaults suit Stable Diffusion's CLIP text encoder."""

    max_tokens: int = 75  # CLIP token budget (SD's CLIP reads 75 + 2 specials); 0 = no check
    t5_max_tokens: int = 0  # T5 budget (Flux / SD3 trainers, typically 256 or 512); 0 = no check
    min_words: int = 3  # fewer words than this -> "short" (0 disables)
    max_repeats: int = 3  # an n-gram (n = 1..4) back-to-back more than this -> "repetition" (0 disables)
    max_ngram_share: float = 0.5  # one n-gram (n = 2..4, >= 3 times) covering more than this share (0 disables)
    low_score_percentile: float = 5.0  # "low_score": CLIPScore in the lowest this-percent of the run (0 disables)

    def __post_init__(self) -> None:
        # Bad values would make every caption pass or every caption fail without a word; say so at once.
        for name in ("max_tokens", "t5_max_tokens", "min_words", "max_repeats"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0.0 <= self.max_ngram_share <= 1.0:
            raise ValueError(f"max_ngram_share must be between 0 and 1, got {self.max_ngram_share}")
        if not 0.0 <= self.low_score_percentile <= 100.0:
            raise ValueError(f"low_score_percentile must be between 0 and 100, got {self.low_score_percentile}")


# --- per-caption checks ---------------------------------------------------------------------------


def words_of(text: str) -> list[str]:
    """Lower-cased word tokens: repetition is about words, not case or punctuation."""
    return [word.lower() for word in WORD.findall(text)]


def check_caption(text: str, settings: GateSettings, count_tokens: TokenCounter | None = None,
                  count_t5_tokens: TokenCounter | None = None) -> list[Flag]:
    """Every flag of one caption, at most one per code, in GATE_CODES order ("low_score" needs the run).

    An empty caption gets only "empty": the other gates would just restate that it is empty.
    """
    words = words_of(text)
    if not words:
        return [Flag("empty", "caption is empty")]
    flags: list[Flag] = []
    short = short_flag(words, settings.min_words)
    if short is not None:
        flags.append(short)
    repetition = repetition_flag(text, words, settings)
    if repetition is not None:
        flags.append(repetition)
    if count_tokens is not None:
        budget = budget_flag(text, "over_budget", "CLIP", settings.max_tokens, count_tokens)
        if budget is not None:
            flags.append(budget)
    if count_t5_tokens is not None:
        budget = budget_flag(text, "over_t5_budget", "T5", settings.t5_max_tokens, count_t5_tokens)
        if budget is not None:
            flags.append(budget)
    return flags


def short_flag(words: Sequence[str], min_words: int) -> Flag | None:
    """A caption of one or two words rarely describes an image well enough to train on."""
    if min_words <= 0 or len(words) >= min_words:
        return None
    return Flag("short", f"caption has {plural(len(words), 'word')}, fewer than {min_words}")


def budget_flag(text: str, code: str, encoder: str, budget: int, count_tokens: TokenCounter) -> Flag | None:
    """Tokens past the encoder's budget are dropped by the trainer, so the image is trained on a cut caption."""
    if budget <= 0:
        return None
    tokens = count_tokens(text)
    if tokens <= budget:
        return None
    return Flag(code, f"caption is {tokens} {encoder} tokens, more than {budget}: the text encoder truncates the rest")


def repetition_flag(text: str, words: Sequence[str], settings: GateSettings) -> Flag | None:
    """The first repetition rule that fires: repeated tag, back-to-back loop, then one n-gram taking over.

    Only one flag: the rules often fire together on the same loop and one message is enough to find it.
    """
    if settings.max_repeats > 0:
        message = repeated_tag(text, settings.max_repeats) or consecutive_repeat(words, settings.max_repeats)
        if message:
            return Flag("repetition", message)
    if settings.max_ngram_share > 0:
        message = dominant_ngram(words, settings.max_ngram_share)
        if message:
            return Flag("repetition", message)
    return None


def repeated_tag(text: str, max_repeats: int) -> str | None:
    """Tag lists ("1girl, solo, smile") loop by repeating a tag anywhere, not only back-to-back."""
    if "," not in text:
        return None
    tags = Counter(tuple(words_of(tag)) for tag in text.split(","))
    tags.pop((), None)
    if not tags:
        return None
    tag, count = tags.most_common(1)[0]
    if count <= max_repeats:
        return None
    return f"the tag '{' '.join(tag)}' appears {count} times"


def consecutive_repeat(words: Sequence[str], max_repeats: int) -> str | None:
    """The longest back-to-back run of one n-gram (n = 1..4) repeated more than max_repeats times.

    For a fixed n, a run of k copies is a stretch of (k - 1) * n positions where word j equals word j + n,
    so one linear pass per n finds every run, however long the loop.
    """
    best: tuple[int, int, int, int] | None = None  # (-covered words, n, start, repeats): smallest is best
    for n in range(1, MAX_NGRAM + 1):
        for start, length in equal_streaks(words, n):
            repeats = length // n + 1
            gram = tuple(words[start:start + n])
            # "dog dog" x4 is "dog" x8: the smaller unit reports it, with the same or more words covered.
            if repeats <= max_repeats or has_smaller_period(gram):
                continue
            candidate = (-repeats * n, n, start, repeats)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    _, n, start, repeats = best
    gram_text = " ".join(words[start:start + n])
    if n == 1:
        return f"the word '{gram_text}' repeats {repeats} times in a row"
    return f"the words '{gram_text}' repeat {repeats} times in a row"


def equal_streaks(words: Sequence[str], n: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal stretch of positions j where words[j] == words[j + n]."""
    streaks: list[tuple[int, int]] = []
    start = None
    for j in range(len(words) - n + 1):
        equal = j < len(words) - n and words[j] == words[j + n]
        if equal and start is None:
            start = j
        elif not equal and start is not None:
            streaks.append((start, j - start))
            start = None
    return streaks


def has_smaller_period(gram: Sequence[str]) -> bool:
    """True when the n-gram is itself a repeat of a shorter unit ("a b a b" of "a b")."""
    n = len(gram)
    return any(n % d == 0 and list(gram) == list(gram[:d]) * (n // d) for d in range(1, n))


def dominant_ngram(words: Sequence[str], max_share: float) -> str | None:
    """One n-gram (n = 2..4) seen at least 3 times and covering more than max_share of the words.

    Catches loops that are not strictly back-to-back, such as "a man and a man and a man".
    Occurrences are counted without overlap, so "a a a a" holds "a a" twice, not three times.
    """
    total = len(words)
    best: tuple[float, int, int, int] | None = None  # (-share, n, first index, count): smallest is best
    for n in range(2, MAX_NGRAM + 1):
        positions: dict[tuple[str, ...], list[int]] = {}
        for j in range(total - n + 1):
            positions.setdefault(tuple(words[j:j + n]), []).append(j)
        for starts in positions.values():
            count = count_without_overlap(starts, n)
            share = count * n / total
            if count < 3 or share <= max_share:
                continue
            candidate = (-share, n, starts[0], count)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    negative_share, n, first, count = best
    gram_text = " ".join(words[first:first + n])
    return f"the words '{gram_text}' make up {-negative_share:.0%} of the caption ({count} times)"


def count_without_overlap(starts: Sequence[int], n: int) -> int:
    """How many of these sorted n-gram starts can be taken left to right without two overlapping."""
    count, free_from = 0, 0
    for start in starts:
        if start >= free_from:
            count += 1
            free_from = start + n
    return count


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --- run-level checks: low CLIPScore ---------------------------------------------------------------


def valid_scores(scores: Sequence[float | None]) -> list[tuple[int, float]]:
    """(index, score) of the scored captions: None (not scored) and NaN (failed score) are left out."""
    return [(index, float(score)) for index, score in enumerate(scores)
            if score is not None and not math.isnan(score)]


def score_threshold(scores: Sequence[float | None], percentile: float) -> float | None:
    """The nearest-rank `percentile` of the run's scores, so the caller can print where the cut fell.

    None when there is nothing to compare (fewer than 2 scores) or the gate is off (percentile 0).
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
    values = sorted(score for _, score in valid_scores(scores))
    if len(values) < 2 or percentile <= 0:
        return None
    # round() absorbs float noise such as 7 * 100 / 100 landing a hair above 7.
    rank = max(1, math.ceil(round(percentile * len(values) / 100.0, 9)))
    return values[rank - 1]


def low_score_outliers(scores: Sequence[float | None], percentile: float) -> set[int]:
    """Indices of the scores at or below the run's `percentile` threshold (ties at the threshold included).

    Relative to the run rather than an absolute cut: CLIPScore levels differ between CLIP models and
    datasets, but the worst few percent of any run are the captions most worth a second look.
    """
    threshold = score_threshold(scores, percentile)
    if threshold is None:
        return set()
    return {index for index, score in valid_scores(scores) if score <= threshold}


def low_score_flag(score: float, threshold: float) -> Flag:
    """The flag of a caption found by low_score_outliers."""
    return Flag("low_score", f"CLIPScore {score:.4g} is among the lowest of the run (threshold {threshold:.4g})")


# --- trimming to a token budget ----------------------------------------------------------------------


def trim_to_budget(text: str, budget: int, count_tokens: TokenCounter) -> str:
    """The longest clean prefix of `text` that fits `budget` tokens; `text` itself when it already fits.

    A trainer truncates an over-long caption mid-phrase; cutting at a sentence or a comma keeps whole
    ideas instead. Preference: the last fitting sentence cut, unless the last fitting comma cut keeps more
    than twice as much; then that comma cut; and when the chosen cut keeps less than half of what the last
    fitting whole-word cut keeps (or there is none), the whole-word cut. Never splits a word, never returns
    text that does not fit, "" when not even the first word fits. Counts tokens O(log n) times, assuming
    (as holds for real tokenizers) that a longer prefix never has fewer tokens.
    """
    if budget < 0:
        raise ValueError(f"budget must be 0 or more, got {budget}")
    if count_tokens(text) <= budget:
        return text
    sentence = last_fitting(sentence_cuts(text), budget, count_tokens)
    comma = last_fitting(comma_cuts(text), budget, count_tokens)
    word = last_fitting(word_cuts(text), budget, count_tokens)
    boundary = sentence
    if sentence is None or (comma is not None and len(sentence) * 2 < len(comma)):
        boundary = comma
    chosen = boundary
    if word is not None and (boundary is None or len(boundary) * 2 < len(word)):
        chosen = word
    logger.debug("trimmed a caption of %d characters to %d to fit %d tokens",
                 len(text), len(chosen or ""), budget)
    return chosen or ""


def last_fitting(cuts: Sequence[str], budget: int, count_tokens: TokenCounter) -> str | None:
    """Binary search for the longest cut that fits; cuts are distinct prefixes, shortest first."""
    low, high = 0, len(cuts) - 1
    found = None
    while low <= high:
        middle = (low + high) // 2
        if count_tokens(cuts[middle]) <= budget:
            found = cuts[middle]
            low = middle + 1
        else:
            high = middle - 1
    return found


def sentence_cuts(text: str) -> list[str]:
    """Prefixes ending a sentence: '.', '!' and '?' are kept, a ';' is dropped (it would dangle)."""
    cuts = []
    for match in SENTENCE_END.finditer(text):
        kept = text[:match.end()]
        if match.group() == ";":
            kept = kept[:-1].rstrip(DANGLING)
        cuts.append(kept)
    return distinct_prefixes(cuts)


def comma_cuts(text: str) -> list[str]:
    """Prefixes ending just before a comma, without the comma or the space before it."""
    return distinct_prefixes([text[:match.start()].rstrip(DANGLING) for match in COMMA.finditer(text)])


def word_cuts(text: str) -> list[str]:
    """Prefixes ending after a whitespace-separated word, without trailing commas, colons or open brackets.

    Whitespace words, not regex words, so "don't" or "3.5" are never cut inside.
    """
    return distinct_prefixes([text[:match.end()].rstrip(DANGLING) for match in re.finditer(r"\S+", text)])


def distinct_prefixes(cuts: Sequence[str]) -> list[str]:
    """Non-empty cuts holding a word, each longer than the one before, so the binary search can rely on order."""
    kept: list[str] = []
    for cut in cuts:
        if WORD.search(cut) and (not kept or len(cut) > len(kept[-1])):
            kept.append(cut)
    return kept


# --- batch summary ----------------------------------------------------------------------------------


def flag_codes(flags: Sequence[Flag]) -> list[str]:
    """The codes of some flags, in order, for compact logs and JSON reports."""
    return [flag.code for flag in flags]


def summarize(flags_per_caption: Sequence[Sequence[Flag]]) -> dict[str, int]:
    """How many captions carry each code (a caption counts once per code); every code present, 0 when none."""
    counts = dict.fromkeys(GATE_CODES, 0)
    for flags in flags_per_caption:
        for code in set(flag_codes(flags)):
            counts[code] += 1
    return counts
