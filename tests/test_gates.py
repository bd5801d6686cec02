"""Quality gates on crafted captions: each gate fires on its degenerate case and stays quiet on normal ones."""

from __future__ import annotations

import random
import re

import pytest

from captioners.judging.gates import (
    GATE_CODES,
    Flag,
    GateSettings,
    check_caption,
    flag_codes,
    low_score_flag,
    low_score_outliers,
    score_threshold,
    summarize,
    trim_to_budget,
)

DEFAULTS = GateSettings()
NORMAL_CAPTIONS = (
    "a dog runs through the grass .",
    "a man in a red shirt and a woman in a blue shirt",
    "1girl, solo, long hair, smile",
    "the the cat sits on the mat",
    "A photograph of a lighthouse on a rocky coast at sunset, waves crashing below.",
)


def count_words(text: str) -> int:
    """Stand-in tokenizer: one token per word and per punctuation mark."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def count_chars(text: str) -> int:
    return len(text)


@pytest.fixture(scope="module")
def count_clip():
    """open_clip's real CLIP BPE (its vocabulary ships with the package, so this works offline)."""
    tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    tokenizer = tokenizer_module.SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text))


# --- check_caption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("caption", NORMAL_CAPTIONS)
def test_normal_captions_pass_every_gate(caption):
    settings = GateSettings(t5_max_tokens=256)
    assert check_caption(caption, settings, count_words, count_words) == []


def test_normal_captions_pass_with_the_real_clip_tokenizer(count_clip):
    for caption in NORMAL_CAPTIONS:
        assert check_caption(caption, DEFAULTS, count_clip) == []


@pytest.mark.parametrize("caption", ["", "   ", " \n\t", ".", " , . ! ", "..."])
def test_empty_caption_gets_only_the_empty_flag(caption):
    flags = check_caption(caption, GateSettings(max_tokens=1, t5_max_tokens=1), count_words, count_words)
    assert flags == [Flag("empty", "caption is empty")]


def test_one_word_caption_is_short():
    assert check_caption("dog", DEFAULTS) == [Flag("short", "caption has 1 word, fewer than 3")]


def test_punctuation_is_not_a_word():
    assert check_caption("a dog .", DEFAULTS) == [Flag("short", "caption has 2 words, fewer than 3")]
    assert check_caption("a dog runs", DEFAULTS) == []


def test_short_gate_can_be_disabled():
    assert check_caption("dog", GateSettings(min_words=0)) == []


def test_word_repeated_back_to_back():
    assert check_caption("a dog dog dog dog", DEFAULTS) == [
        Flag("repetition", "the word 'dog' repeats 4 times in a row")]


def test_three_repeats_are_allowed_by_default():
    assert check_caption("a dog dog dog", DEFAULTS) == []
    assert check_caption("the the", GateSettings(min_words=0)) == []


def test_repetition_ignores_case_and_punctuation():
    assert flag_codes(check_caption("a Dog, dog. DOG! dog", DEFAULTS)) == ["repetition"]
    assert check_caption("a Dog, dog. DOG! dog", DEFAULTS)[0].message == "the word 'dog' repeats 4 times in a row"


def test_long_loop_reports_the_smallest_unit_with_the_full_count():
    caption = "a photo of " + "dog " * 8
    assert check_caption(caption, DEFAULTS) == [Flag("repetition", "the word 'dog' repeats 8 times in a row")]


def test_phrase_repeated_back_to_back():
    caption = "a man standing on the beach on the beach on the beach on the beach"
    assert check_caption(caption, DEFAULTS) == [
        Flag("repetition", "the words 'on the beach' repeat 4 times in a row")]


def test_four_word_phrase_loop():
    caption = "there is " + "a cat and dog " * 5
    assert check_caption(caption, DEFAULTS) == [
        Flag("repetition", "the words 'a cat and dog' repeat 5 times in a row")]


def test_max_repeats_setting():
    assert check_caption("a dog dog dog", GateSettings(max_repeats=2)) == [
        Flag("repetition", "the word 'dog' repeats 3 times in a row")]
    assert check_caption("a dog dog dog dog dog", GateSettings(max_repeats=5)) == []


def test_loop_that_is_not_back_to_back_is_caught_by_the_share_rule():
    caption = "a man and a man and a man"
    assert check_caption(caption, DEFAULTS) == [
        Flag("repetition", "the words 'a man' make up 75% of the caption (3 times)")]


def test_share_rule_needs_three_occurrences_and_the_share():
    assert check_caption("a man and a man", DEFAULTS) == []  # 2 times only
    caption = "a man and a man and a man walking along a quiet road near the old town at dusk"
    assert check_caption(caption, DEFAULTS) == []  # 'a man' x3 is 6 of 18 words
    assert check_caption("a man and a man and a man", GateSettings(max_ngram_share=0.8)) == []
    assert check_caption("a man and a man and a man", GateSettings(max_ngram_share=0)) == []


def test_share_rule_counts_occurrences_without_overlap():
    # "x x" occurs at 5 overlapping places but only 3 times without overlap: 6 of 6 words.
    assert check_caption("x x x x x x", GateSettings(max_repeats=0)) == [
        Flag("repetition", "the words 'x x' make up 100% of the caption (3 times)")]
    # "x x" fits twice into 5 words: not flagged by the share rule.
    assert check_caption("x x x x y", GateSettings(max_repeats=0)) == []


def test_tag_repeated_anywhere_in_a_tag_list():
    assert check_caption("1girl, solo, solo, solo, solo", DEFAULTS) == [
        Flag("repetition", "the tag 'solo' appears 4 times")]
    caption = "1girl, long hair, smile, long hair, outdoors, long hair, sky, Long Hair"
    assert check_caption(caption, DEFAULTS) == [Flag("repetition", "the tag 'long hair' appears 4 times")]
    assert check_caption("1girl, solo, smile, solo, sky, solo", DEFAULTS) == []


def test_over_clip_budget_with_word_counter():
    caption = " ".join(f"w{i}" for i in range(91))
    assert check_caption(caption, DEFAULTS, count_words) == [
        Flag("over_budget", "caption is 91 CLIP tokens, more than 75: the text encoder truncates the rest")]
    assert check_caption(" ".join(f"w{i}" for i in range(75)), DEFAULTS, count_words) == []


def test_over_clip_budget_with_the_real_clip_tokenizer(count_clip):
    caption = ("a detailed photograph of an old stone lighthouse standing on a rocky coast at sunset, "
               "waves crashing against the cliffs below, seagulls flying overhead, dramatic orange and "
               "purple clouds filling the sky, a small fishing boat returning to the harbour, warm light "
               "on the wet rocks, long exposure, high resolution, award winning landscape photography, "
               "sharp focus, natural colours, wide angle lens, golden hour atmosphere")
    tokens = count_clip(caption)
    assert tokens > 75
    assert check_caption(caption, DEFAULTS, count_clip) == [
        Flag("over_budget", f"caption is {tokens} CLIP tokens, more than 75: the text encoder truncates the rest")]
    assert count_clip("a dog runs through the grass .") == 7


def test_budget_checks_need_a_counter_and_a_budget():
    caption = " ".join(f"w{i}" for i in range(100))
    assert check_caption(caption, DEFAULTS) == []  # no counter
    assert check_caption(caption, GateSettings(max_tokens=0), count_words) == []
    assert check_caption(caption, DEFAULTS, None, count_words) == []  # t5_max_tokens = 0


def test_over_t5_budget():
    caption = " ".join(f"w{i}" for i in range(60))
    settings = GateSettings(max_tokens=75, t5_max_tokens=50)
    assert check_caption(caption, settings, count_words, count_words) == [
        Flag("over_t5_budget", "caption is 60 T5 tokens, more than 50: the text encoder truncates the rest")]


def test_flags_come_in_gate_order():
    caption = "dog " * 80
    flags = check_caption(caption, GateSettings(min_words=100, t5_max_tokens=10), count_words, count_words)
    assert flag_codes(flags) == ["short", "repetition", "over_budget", "over_t5_budget"]
    assert flags[1].message == "the word 'dog' repeats 80 times in a row"


def test_bad_settings_and_codes_are_refused():
    with pytest.raises(ValueError):
        GateSettings(max_tokens=-1)
    with pytest.raises(ValueError):
        GateSettings(max_ngram_share=1.5)
    with pytest.raises(ValueError):
        GateSettings(low_score_percentile=101)
    with pytest.raises(ValueError):
        Flag("typo", "not a gate")


# --- low_score ----------------------------------------------------------------------------------------


def test_low_score_outliers_nearest_rank():
    scores = [float(value) for value in range(100, 0, -1)]  # index i holds 100 - i
    assert low_score_outliers(scores, 5.0) == {95, 96, 97, 98, 99}
    assert score_threshold(scores, 5.0) == 5.0
    assert low_score_outliers(scores, 7.0) == set(range(93, 100))  # 7% of 100 is exactly 7
    assert low_score_outliers([0.3, 0.2, 0.25, 0.1], 5.0) == {3}  # rank rounds up to at least 1
    assert low_score_outliers([0.3, 0.2, 0.25, 0.1], 50.0) == {1, 3}
    assert low_score_outliers([0.3, 0.2, 0.25, 0.1], 100.0) == {0, 1, 2, 3}


def test_low_score_ties_at_the_threshold_are_included():
    scores = [0.31, 0.12, 0.28, 0.12, 0.12, 0.33, 0.29, 0.30, 0.27, 0.26]
    assert score_threshold(scores, 10.0) == 0.12
    assert low_score_outliers(scores, 10.0) == {1, 3, 4}


def test_low_score_skips_missing_scores():
    scores = [None, 0.30, float("nan"), 0.10, None, 0.20]
    assert low_score_outliers(scores, 34.0) == {3, 5}  # 34% of 3 scores: rank 2
    assert score_threshold(scores, 34.0) == 0.20
    assert low_score_outliers(scores, 33.0) == {3}


def test_low_score_needs_two_scores_and_a_percentile():
    assert low_score_outliers([], 5.0) == set()
    assert low_score_outliers([0.2], 50.0) == set()
    assert low_score_outliers([None, 0.2, None], 50.0) == set()
    assert score_threshold([0.2], 50.0) is None
    assert low_score_outliers([0.2, 0.1], 0.0) == set()
    assert score_threshold([0.2, 0.1], 0.0) is None
    assert low_score_outliers([0.2, 0.1], 5.0) == {1}
    with pytest.raises(ValueError):
        low_score_outliers([0.2, 0.1], -1.0)


def test_low_score_flag():
    assert low_score_flag(0.18234, 0.2) == Flag(
        "low_score", "CLIPScore 0.1823 is among the lowest of the run (threshold 0.2)")
    assert low_score_flag(18.5, 21.25).code == "low_score"


# --- summary ------------------------------------------------------------------------------------------


def test_summarize_counts_captions_per_code():
    flagged = [check_caption(caption, DEFAULTS) for caption in ("", "dog", "a dog dog dog dog", "a cat sleeps")]
    flagged.append([Flag("low_score", "x"), Flag("repetition", "a"), Flag("repetition", "b")])
    assert summarize(flagged) == {"empty": 1, "short": 1, "repetition": 2, "over_budget": 0,
                                  "over_t5_budget": 0, "low_score": 1}
    assert summarize([]) == dict.fromkeys(GATE_CODES, 0)
    assert list(summarize([])) == list(GATE_CODES)


def test_flag_codes_keeps_order():
    assert flag_codes([Flag("short", "a"), Flag("empty", "b")]) == ["short", "empty"]
    assert flag_codes([]) == []


# --- trim_to_budget -------------------------------------------------------------------------------------


def test_text_within_budget_is_returned_unchanged():
    text = "  a dog, running.  "
    assert trim_to_budget(text, 6, count_words) is text
    assert trim_to_budget("", 0, count_words) == ""


def test_trim_prefers_the_last_sentence_that_fits():
    text = "A dog runs on the beach. It is sunny, with clouds. Waves crash on the shore, loudly"
    # sentence cuts: 7 and 14 tokens; comma cuts: 10 and 20 tokens
    assert trim_to_budget(text, 16, count_words) == "A dog runs on the beach. It is sunny, with clouds."
    assert trim_to_budget(text, 13, count_words) == "A dog runs on the beach."  # comma cut of 9 words is < twice
    assert trim_to_budget(text, 7, count_words) == "A dog runs on the beach."


def test_trim_takes_the_comma_cut_when_the_sentence_cut_is_less_than_half():
    text = "A dog. It runs along the long sandy beach near the old harbour wall, chasing gulls, barking"
    # the sentence cut keeps 6 characters (3 tokens), the comma cut "... wall" 67 (15 tokens)
    assert trim_to_budget(text, 17, count_words) == (
        "A dog. It runs along the long sandy beach near the old harbour wall")
    # no comma cut fits: the whole-word cut keeps far more than twice the sentence cut
    assert trim_to_budget(text, 14, count_words) == "A dog. It runs along the long sandy beach near the old harbour"


def test_trim_takes_the_comma_cut_without_any_sentence():
    text = "1girl, solo, long hair, smile, looking at viewer, outdoors"
    assert trim_to_budget(text, 9, count_words) == "1girl, solo, long hair, smile"
    assert trim_to_budget(text, 7, count_words) == "1girl, solo, long hair"
    assert trim_to_budget(text, 1, count_words) == "1girl"
    assert trim_to_budget("1girl, solo", 0, count_words) == ""


def test_trim_falls_back_to_whole_words():
    text = "a dog running through a field of tall grass under a cloudy sky"
    assert trim_to_budget(text, 5, count_words) == "a dog running through a"
    assert trim_to_budget(text, 9, count_chars) == "a dog"  # "a dog run" would split "running"
    assert trim_to_budget(text, 4, count_chars) == "a"
    assert trim_to_budget("elephant", 4, count_chars) == ""


def test_trim_prefers_whole_words_over_a_tiny_comma_cut():
    text = "Portrait, a woman with long red hair standing in a field of tall golden grass at dusk"
    assert trim_to_budget(text, 6, count_words) == "Portrait, a woman with long"
    assert trim_to_budget(text, 12, count_words) == "Portrait, a woman with long red hair standing in a field"
    assert trim_to_budget(text, 3, count_words) == "Portrait"  # "Portrait, a" is not twice as long


def test_trim_never_leaves_a_dangling_comma_or_semicolon():
    assert trim_to_budget("red, green; blue and yellow and", 3, count_words) == "red, green"
    text = "a dog ( running ) in the park , happily"
    assert trim_to_budget(text, 3, count_words) == "a dog"
    assert trim_to_budget("a dog; a cat; a bird", 5, count_words) == "a dog; a cat"


def test_trim_does_not_cut_inside_numbers_or_contractions():
    assert trim_to_budget("it costs 1,000 dollars today", 12, count_chars) == "it costs"
    assert trim_to_budget("we don't know why", 7, count_chars) == "we"
    assert trim_to_budget("version 3.5 of it", 10, count_chars) == "version"


def test_trim_with_the_real_clip_tokenizer(count_clip):
    text = ("a detailed photograph of an old stone lighthouse standing on a rocky coast at sunset. "
            "Waves crash against the cliffs below, seagulls fly overhead, dramatic orange and purple clouds "
            "fill the sky, a small fishing boat returns to the harbour, warm light shines on the wet rocks, "
            "long exposure, high resolution, award winning landscape photography, sharp focus, natural colours, "
            "wide angle lens, golden hour atmosphere, cinematic mood, soft shadows, vivid detail")
    trimmed = trim_to_budget(text, 75, count_clip)
    assert count_clip(text) > 75
    assert count_clip(trimmed) <= 75
    assert trimmed == text[:len(trimmed)]
    # 73 tokens; adding ", golden hour atmosphere" would make 78. The comma cut is more than twice the sentence.
    assert trimmed == text[:text.index(", golden hour")]
    assert count_clip(trimmed) == 73


def test_trim_counts_tokens_a_logarithmic_number_of_times():
    calls = []

    def counting(text: str) -> int:
        calls.append(text)
        return count_words(text)

    text = ". ".join(", ".join(f"w{s}x{c} more words" for c in range(5)) for s in range(200))
    trimmed = trim_to_budget(text, 300, counting)
    assert count_words(trimmed) <= 300
    assert len(calls) <= 3 * 12 + 1  # three binary searches over at most 4000 cuts, plus the first check


WORDS = ("a", "dog", "running", "through", "tall", "grass", "photograph", "of", "the", "sky", "don't",
         "3.5", "well-known", "1girl", "(smiling)", "red", "sunset", "x")
SEPARATORS = (" ", " ", " ", " ", ", ", ". ", "; ", "! ", " , ", "? ")


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 30)):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts[:-1]) + rng.choice(("", ".", ","))


def brute_force_trim(text: str, budget: int, count) -> str:
    """The rule of trim_to_budget, by trying every cut: the reference the fast version must match."""
    if count(text) <= budget:
        return text
    strip = " \t\r\n,;:-([{/&"

    def longest(cuts):
        fitting = [cut for cut in cuts if re.search(r"\w", cut) and count(cut) <= budget]
        return max(fitting, key=len, default=None)

    sentences = []
    for match in re.finditer(r"[.!?;](?=\s|$)", text):
        kept = text[:match.end()]
        sentences.append(kept[:-1].rstrip(strip) if match.group() == ";" else kept)
    commas = [text[:m.start()].rstrip(strip) for m in re.finditer(r"(?<!\d),|,(?!\d)", text)]
    words = [text[:m.end()].rstrip(strip) for m in re.finditer(r"\S+", text)]
    sentence, comma, word = longest(sentences), longest(commas), longest(words)
    boundary = sentence if sentence is not None and (comma is None or 2 * len(sentence) >= len(comma)) else comma
    if word is not None and (boundary is None or 2 * len(boundary) < len(word)):
        return word
    return boundary or ""


@pytest.mark.parametrize("count", [count_chars, count_words], ids=["chars", "words"])
def test_trim_property_over_random_texts(count):
    rng = random.Random(1234)
    trimmed_some = 0
    for _ in range(200):
        text = random_text(rng)
        budget = rng.randint(0, count(text) + 2)
        trimmed = trim_to_budget(text, budget, count)
        assert count(trimmed) <= budget, (text, budget, trimmed)
        assert text.startswith(trimmed), (text, budget, trimmed)
        if trimmed != text:
            trimmed_some += 1
            rest = text[len(trimmed):]
            # whole words: the cut falls where a space or punctuation follows (never inside a \w run)
            assert not (trimmed and re.match(r"\w", trimmed[-1]) and re.match(r"\w", rest)), (text, trimmed)
            assert not trimmed.endswith((",", ";", " ")), (text, trimmed)
        assert trimmed == brute_force_trim(text, budget, count), (text, budget)
    assert trimmed_some > 100
