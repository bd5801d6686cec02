"""SBG keywords: the ICG vocabulary, CLIP zero-shot label choices and their cached text features.

Reproduces the keyword half of the ICG extension's ``generate_caption`` (checkpoint-formats.md,
section 1b), with its exact semantics: labels are ranked by ``softmax(100 * image @ text.T)`` and,
like the original's ``{label: prob}`` dicts, a repeated label counts once at its first place,
ties keep list order, and an empty encyclopedia list adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from captioners.errors import CaptionerError
from captioners.weights import load_plain_pickle, save_safetensors

log = logging.getLogger(__name__)

KEYWORD_POS = ("NOUN", "ADV", "ADJ")
PRIME_SUBJECTS = ("landscape", "people", "animal", "plant", "some object")
ALWAYS_RUN = " landscape some object"  # appended to the top prime label: these branches always run
CATEGORY = {"landscape": "scenery", "animal": "animal", "plant": "plant", "some object": "object"}
TERTIARY_TOP = {"landscape": 3, "animal": 1, "plant": 3, "some object": 3}
TERTIARY_LIMIT = 100
TOP_PERCENT = 0.5
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black")
GARMENTS = ("shirt", "suit", "cloth", "jacket")
ENCYCLOPEDIA_DICTS = ("scenery", "animal", "plant", "object", "activity", "weather", "time")

Choices = dict[str, str]  # CLIP label text -> the keyword it adds


# ---- vocabulary files -------------------------------------------------------------------------
def read_vocabulary_file(path: Path, convert: bool) -> Any:
    """A vocabulary pickle (read with the builtins-only unpickler) or its JSON conversion.

    With ``convert``, a pickle is converted once to JSON beside it, which is read from then on.
    """
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
            raise CaptionerError(f"Could not read {path}: {reason}. Delete it to convert the pickle again.") from None
    data = load_plain_pickle(path)
    if convert:
        try:
            text = json.dumps(data, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            raise CaptionerError(f"{path} does not hold a vocabulary (lists and dicts of words).") from None
        target = path.with_suffix(".json")
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        log.info("Converted %s to %s", path.name, target.name)
    return data


class Vocabulary:
    """The top keywords of ``all_labels.pkl`` and the ``encyclopedia.pkl`` category tree."""

    def __init__(self, labels: Any, encyclopedia: Any, size: int = 1000, source: str = "vocabulary"):
        self.keywords = _keywords(labels, size, source)
        self.encyclopedia = _checked_encyclopedia(encyclopedia, source)
        payload = json.dumps([self.keywords, self.encyclopedia], sort_keys=True, ensure_ascii=False)
        self.digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _keywords(labels: Any, size: int, source: str) -> list[str]:
    try:
        chosen = [keyword for keyword, pos, _frequency in labels if pos in KEYWORD_POS]
        if not all(isinstance(keyword, str) for keyword in chosen):
            raise TypeError("keywords must be text")
    except (TypeError, ValueError) as exc:
        raise CaptionerError(f"{source}: all_labels must be a list of (keyword, POS, frequency) entries.") from exc
    if not chosen:
        raise CaptionerError(f"{source}: all_labels has no NOUN, ADV or ADJ keyword.")
    return chosen[:size]


def _checked_encyclopedia(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CaptionerError(f"{source}: encyclopedia must be a dict.")
    missing = [key for key in (*ENCYCLOPEDIA_DICTS, "human") if key not in data]
    if missing:
        raise CaptionerError(f"{source}: encyclopedia lacks {', '.join(missing)}.")
    for key in ENCYCLOPEDIA_DICTS:
        if not isinstance(data[key], dict) or not all(_is_word_list(v) for v in data[key].values()):
            raise CaptionerError(f"{source}: encyclopedia[{key!r}] must map names to word lists.")
    if not _is_word_list(data["human"]):
        raise CaptionerError(f"{source}: encyclopedia['human'] must be a word list.")
    return data


def _is_word_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(word, str) for word in value)


# ---- label sets --------------------------------------------------------------------------------
def _value(label: str, marker: str) -> str:
    """The keyword inside a label, extracted as the original does ('picture of x.' -> 'x')."""
    return label.split(marker)[1].strip()[:-1]


def _choices(template: str, marker: str, words: Sequence[str]) -> Choices:
    labels = [template.format(word) for word in words]
    return {label: _value(label, marker) for label in labels}


class LabelSets:
    """Every fixed label list of the pipeline, built once per vocabulary."""

    def __init__(self, vocabulary: Vocabulary):
        enc = vocabulary.encyclopedia
        self.vocabulary = vocabulary
        self.keywords = vocabulary.keywords
        self.prime = [f"picture of {' and '.join(group)}."
                      for size in (1, 2, 3) for group in combinations(PRIME_SUBJECTS, size)]
        subjects = ["a man", "a woman", "a boy", "a girl", "an old man", "an old woman"]
        plurals = ["men", "women", "boys", "girls", "old men", "old women"]
        counts = ["two", "three", "four"]
        people = (subjects + [f"{n} {p}" for n in counts for p in plurals] + [f"{n} people" for n in counts]
                  + ["a crowd of people"])
        self.people = [
            _choices("picture of {}.", "picture of", people),
            _choices("picture of {}.", "picture of", enc["human"]),  # occupation
            _choices("wearing {}.", "wearing", [f"{c} {g}" for g in GARMENTS for c in COLOURS]),
        ]
        self.secondary = {
            branch: _choices("picture of {}.", "picture of",
                             [k for k in enc[CATEGORY[branch]] if k != "clothing and fashion"])
            for branch in CATEGORY}
        self.time = _choices("picture during {}.", "picture during", list(enc["time"]))
        self.weather = _choices("picture during {}.", "picture during", list(enc["weather"]))
        self.activity = _choices("activity is {}.", "activity is", list(enc["activity"]))

    def tertiary(self, branch: str, key: str) -> Choices:
        words = self.vocabulary.encyclopedia[CATEGORY[branch]].get(key, [])
        return _choices("picture of {}.", "picture of", words[:TERTIARY_LIMIT])

    def activity_words(self, key: str) -> Choices:
        words = self.vocabulary.encyclopedia["activity"].get(key, [])
        return _choices("activity is {}.", "activity is", words[:TERTIARY_LIMIT])

    def fixed_labels(self) -> list[str]:
        """Labels every image needs; worth encoding in one go."""
        sets = [*self.people, *self.secondary.values(), self.time, self.weather, self.activity]
        return [*self.keywords, *self.prime, *(label for choices in sets for label in choices)]


# ---- choosing keywords for one image -------------------------------------------------------------
Features = Callable[[Sequence[str]], torch.Tensor]  # labels -> (len, D) L2-normalised features


def rank(image: torch.Tensor, labels: Sequence[str], features: Features) -> list[tuple[str, float]]:
    """(label, probability) by CLIP, most likely first; a repeated label counts once, at its first place."""
    if not labels:
        return []
    probs = (100.0 * image[None] @ features(labels).T).softmax(dim=-1)[0].tolist()
    table = dict(zip(labels, probs))
    return sorted(table.items(), key=lambda item: item[1], reverse=True)  # stable: ties keep list order


def best(image: torch.Tensor, choices: Choices, count: int, features: Features) -> list[str]:
    return [choices[label] for label, _ in rank(image, list(choices), features)[:count]]


def top_percent(ranked: list[tuple[str, float]], threshold: float = TOP_PERCENT) -> list[str]:
    """Most likely labels until their summed probability exceeds ``threshold`` (at least one)."""
    chosen, total = [], 0.0
    for label, prob in ranked:
        total += prob
        chosen.append(label)
        if total > threshold:
            break
    return chosen


def select_keywords(image: torch.Tensor, sets: LabelSets, features: Features) -> list[str]:
    """The ICG keywords for one (D,) normalised image embedding, sorted by CLIP probability."""
    keywords = top_percent(rank(image, sets.keywords, features))
    prime = rank(image, sets.prime, features)[0][0] + ALWAYS_RUN
    for branch in PRIME_SUBJECTS:
        if branch not in prime:
            continue
        if branch == "people":  # who, their occupation, their clothes: top-1 each
            for choices in sets.people:
                keywords += best(image, choices, 1, features)
            continue
        key = best(image, sets.secondary[branch], 1, features)
        keywords += key
        if key:
            keywords += best(image, sets.tertiary(branch, key[0]), TERTIARY_TOP[branch], features)
    keywords += best(image, sets.time, 1, features)
    if "indoor" not in keywords:
        keywords += best(image, sets.weather, 1, features)
    if "people" in prime or "animal" in prime:
        activity = best(image, sets.activity, 1, features)
        if activity:
            keywords += best(image, sets.activity_words(activity[0]), 1, features)
    return [label for label, _ in rank(image, keywords, features)]


def prompt_for(keywords: Sequence[str]) -> str:
    return ", ".join(keywords) + " ###"


# ---- text features, computed once and kept on disk ---------------------------------------------------
@dataclass
class TextFeatureStore:
    """CLIP text features of label strings. A label is encoded the first time it is needed, and the
    store is saved as safetensors (labels in its metadata), so later runs encode nothing again."""

    encode: Callable[[list[str]], torch.Tensor]
    path: Path | None
    key: str
    index: dict[str, int] | None = None
    matrix: torch.Tensor | None = None
    unsaved: int = 0

    def __post_init__(self) -> None:
        self.index = {}
        if self.path is not None and self.path.is_file():
            self._read()

    def _read(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                matrix = handle.get_tensor("features")
            labels = json.loads(meta.get("labels", "[]"))
        except Exception as exc:  # a damaged cache only costs time: recompute
            log.warning("Ignoring text-feature cache %s: %s", self.path, exc)
            return
        if meta.get("key") != self.key or len(labels) != matrix.shape[0]:
            log.warning("Ignoring text-feature cache %s: made for another CLIP or vocabulary", self.path)
            return
        self.matrix = matrix
        self.index = {label: row for row, label in enumerate(labels)}

    def to(self, device: torch.device) -> None:
        if self.matrix is not None:
            self.matrix = self.matrix.to(device)

    def features(self, labels: Sequence[str]) -> torch.Tensor:
        missing = [label for label in dict.fromkeys(labels) if label not in self.index]
        if missing:
            self.add(missing)
        rows = torch.tensor([self.index[label] for label in labels], device=self.matrix.device)
        return self.matrix.index_select(0, rows)

    def add(self, labels: list[str]) -> None:
        new = self.encode(labels).float()
        start = 0 if self.matrix is None else self.matrix.shape[0]
        self.matrix = new if self.matrix is None else torch.cat((self.matrix, new.to(self.matrix.device)))
        self.index.update({label: start + i for i, label in enumerate(labels)})
        self.unsaved += len(labels)

    def save(self) -> None:
        if not self.unsaved or self.path is None:
            return
        labels = sorted(self.index, key=self.index.get)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors({"features": self.matrix.cpu()}, self.path,
                             metadata={"key": self.key, "labels": json.dumps(labels, ensure_ascii=False)})
            self.unsaved = 0
        except OSError as exc:  # a read-only models folder: keep working from memory
            log.warning("Could not save text features to %s: %s", self.path, exc)
