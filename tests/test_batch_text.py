"""Batch job options, caption text shaping and existing-caption policies (no model needed)."""

from __future__ import annotations

import json
import re

import pytest

from captioners.batch import BatchJob, ExistingPolicy, TextShaping, TriggerMode, merge_texts, shape_caption
from captioners.batch.shaping import clip_token_counter
from captioners.batch.writing import decide
from captioners.errors import CaptionerError
from captioners.options import DecodingOptions


def shaped(text: str, **options) -> str:
    return shape_caption(text, TextShaping(**options))


def test_no_shaping_keeps_the_model_text_on_one_line():
    assert shaped("  a dog runs through the grass .  ") == "a dog runs through the grass ."
    assert shaped("a dog\nruns\tfast\x00 .") == "a dog runs fast ."


def test_prefix_suffix_lowercase_and_flickr_period():
    assert shaped("A Dog runs .", prefix="photo of sks, ", suffix=", 35mm", lowercase=True,
                  strip_period=True) == "photo of sks, a dog runs, 35mm"
    assert shaped("a dog runs.", strip_period=True) == "a dog runs"


def test_trigger_prepend_is_not_doubled():
    assert shaped("a man on a bench", trigger="sks") == "sks, a man on a bench"
    assert shaped("sks man on a bench", trigger="sks") == "sks man on a bench"
    assert shaped("", trigger="sks") == "sks"


def test_trigger_replaces_class_words_or_falls_back_to_prepend():
    options = dict(trigger="sks person", trigger_mode=TriggerMode.REPLACE, class_words=["man", "woman"])
    assert shaped("a man talks to a Woman near a manhole", **options) == \
        "a sks person talks to a sks person near a manhole"
    assert shaped("a dog on a bench", **options) == "sks person, a dog on a bench"


def test_exclude_words_and_tags():
    assert shaped("1girl, solo, watermark, smile, signature", exclude=["watermark", "SIGNATURE"]) == \
        "1girl, solo, smile"
    assert shaped("a man in a red shirt rides a red bike", exclude=["red shirt", "red"]) == \
        "a man in a rides a bike"


def test_regex_replacements_run_before_the_trigger():
    options = dict(replacements=[(r"\bphoto of\b", "picture of"), (r"\s*\d+\s*", " ")], trigger="sks")
    assert shaped("photo of 2 dogs", **options) == "sks, picture of dogs"


def test_merge_texts_dedupes_tags_and_keeps_the_old_caption_intact():
    assert merge_texts("1girl, Smile", "smile, solo, solo", ", ", True, new_first=False) == "1girl, Smile, solo"
    assert merge_texts("1girl, Smile", "smile, solo", " | ", True, new_first=True) == "solo | 1girl, Smile"
    assert merge_texts("1girl, smile", "smile, solo", ", ", False, new_first=False) == "1girl, smile, smile, solo"
    assert merge_texts("a dog runs .", "a dog runs .", ", ", True, new_first=False) == "a dog runs ."
    assert merge_texts("", "a cat", ", ", True, new_first=False) == "a cat"


@pytest.mark.parametrize("policy, old, expected_action, expected_text", [
    ("skip", "old tags", "skip", "old tags"),
    ("overwrite", "old tags", "overwrite", "new, tags"),
    ("append", "old tags", "append", "old tags; new, tags"),
    ("prepend", "old tags", "prepend", "new, tags; old tags"),
    ("append", "new, tags", "unchanged", "new, tags"),
    ("skip", None, "create", "new, tags"),
    ("skip", "  \n", "create", "new, tags"),  # an empty caption file is not a caption
])
def test_decide_applies_each_policy(policy, old, expected_action, expected_text):
    decision = decide(old, "new, tags", ExistingPolicy(policy), "; ", True)
    assert (decision.action, decision.text) == (expected_action, expected_text)


def test_long_captions_are_counted_in_clip_tokens():
    count = clip_token_counter()
    assert count("a dog") == 2
    assert count(", ".join(["a red ball"] * 30)) > 75


def test_job_from_mapping_round_trips_and_checks_values():
    job = BatchJob.from_mapping({
        "inputs": "data", "recursive": True, "extension": "caption", "existing": "append",
        "shaping": {"trigger": "sks", "replacements": [["a", "b"]], "exclude": ["x"]},
        "decoding": {"strategy": "beam", "num_beams": 3}, "batch_size": "4", "jsonl": "out.jsonl"})
    assert job.inputs == ["data"] and job.extension == ".caption" and job.existing is ExistingPolicy.APPEND
    assert job.batch_size == 4 and job.decoding == DecodingOptions(strategy="beam", num_beams=3)
    assert job.shaping.replacements == [("a", "b")]
    again = BatchJob.from_mapping(job.to_dict())
    assert again == job
    json.dumps(job.to_dict())


@pytest.mark.parametrize("data, message", [
    ({"inputs": ["a"], "colour": "red"}, "Unknown batch option(s) colour"),
    ({"inputs": ["a"], "existing": "merge"}, "existing must be one of skip, overwrite, append, prepend"),
    ({"inputs": ["a"], "batch_size": 0}, "batch_size must be at least 1"),
    ({"inputs": ["a"], "batch_size": "many"}, "batch_size must be a whole number"),
    ({"inputs": ["a"], "recursive": "yes"}, "recursive must be true or false"),
    ({"inputs": ["a"], "extension": ".png"}, "is an image extension"),
    ({"inputs": ["a"], "extension": "a/b"}, "is not usable"),
    ({"inputs": ["a"], "shaping": {"replacements": [["(", "x"]]}}, "Bad regular expression"),
    ({"inputs": ["a"], "shaping": {"replacements": ["abc"]}}, "list of [regex, replacement] pairs"),
    ({"inputs": ["a"], "shaping": {"trigger": "sks", "trigger_mode": "replace"}}, "needs class_words"),
    ({"inputs": ["a"], "shaping": {"colour": 1}}, "Unknown shaping option(s) colour"),
    ({"inputs": ["a"], "decoding": {"beams": 3}}, "Unknown decoding option(s) beams"),
    ({"inputs": ["a"], "jsonl": "x.json", "csv": "x.json"}, "must be different files"),
    (["a"], "must be an object"),
])
def test_job_from_mapping_rejects_bad_input_with_a_fix(data, message):
    with pytest.raises(CaptionerError, match=re.escape(message)):
        BatchJob.from_mapping(data)
