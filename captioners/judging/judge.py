"""From a batch of images to judged captions: candidates, shaping, trimming, scores, ranking, gates.

The one place where several captions per image, best-of-N and the quality gates are decided, for
the command line, the batch engine, the tab and the API alike:

1. every model makes its candidates for the batch (``Captioner.caption_candidates``): one plain
   caption, the N best beams, or N seeded samples; several models one after another;
2. each candidate is shaped (the batch's text edits) and, with ``trim_to_budget``, cut to the
   CLIP token budget at a sentence or comma boundary;
3. near-identical candidates of an image (same text after lowercasing and stripping punctuation)
   count once, the first kept;
4. with scoring (``score`` or ``select: clip``) every candidate gets its CLIPScore, as written;
5. they are ranked (``select``: the models' own order, or CLIPScore) and the first
   ``captions_per_image`` kept;
6. the gates flag each kept caption; ``on_flag: retry`` captions a flagged image again with beam
   search and keeps the better of the two (the higher score, else the fewer flags), ``skip`` marks
   it so that the caller writes nothing for it.

"Low score" needs the whole run (the lowest percentile of its scores), so the caller flags it at the
end (:func:`flag_low_scores`); it never triggers ``on_flag``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from captioners.base import Candidates, Captioner
from captioners.errors import CaptionerError
from captioners.judging.gates import Flag, check_caption, low_score_flag, low_score_outliers, trim_to_budget
from captioners.judging.options import JudgingOptions, OnFlag
from captioners.judging.scoring import DEFAULT_SCORE_CLIP, ScoringClip, parse_score_clip, score_groups
from captioners.options import DecodingOptions
from captioners.tensor_preprocess import from_transforms

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]


@dataclass
class JudgedImage:
    """An image's kept captions, best first, with their scores, models and flags."""

    captions: list[str]
    scores: list[float | None]
    models: list[str]
    flags: list[list[Flag]]       # per caption
    retried: bool = False         # on_flag retry captioned it again
    skipped: bool = False         # on_flag skip: its (first) caption is flagged, write nothing

    @property
    def caption(self) -> str:
        return self.captions[0] if self.captions else ""

    @property
    def score(self) -> float | None:
        return self.scores[0] if self.scores else None

    @property
    def flag_codes(self) -> list[str]:
        return [flag.code for flag in self.flags[0]] if self.flags else []

    def to_dict(self) -> dict[str, Any]:
        return {"captions": [{"caption": text, "clip_score": score, "model": model,
                              "flags": [flag.code for flag in flags]}
                             for text, score, model, flags in zip(self.captions, self.scores, self.models, self.flags)],
                "flags": [{"code": flag.code, "message": flag.message} for flag in (self.flags[0] if self.flags else [])],
                "retried": self.retried, "skipped": self.skipped}


def candidate_key(text: str) -> str:
    """Candidates that differ only in case, punctuation or spacing are the same caption."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class _Candidate:
    text: str
    model: str
    score: float | None = None


class Judge:
    """Captions batches of images with one or more loaded captioners and judges the results.

    ``shape`` edits every candidate before it is judged (the batch engine's prefix, trigger...):
    scores, budgets and gates see the caption as it will be written.
    """

    def __init__(self, captioners: Sequence[Captioner], options: DecodingOptions | Mapping[str, Any] | None = None,
                 judging: JudgingOptions | None = None, shape: Callable[[str], str] | None = None,
                 count_tokens: TokenCounter | None = None, count_t5_tokens: TokenCounter | None = None,
                 swap_models: bool = False, scorer: ScoringClip | None = None):
        if not captioners:
            raise CaptionerError("No model given.")
        self.captioners = list(captioners)
        self.options = [captioner.decoding_options(options) for captioner in self.captioners]
        self.judging = judging or JudgingOptions()
        self.shape = shape or (lambda text: text)
        self.count_tokens = count_tokens
        self.count_t5_tokens = count_t5_tokens
        self.swap_models = swap_models and len(self.captioners) > 1
        self.homes = [captioner.device for captioner in self.captioners]  # where each works (swap_models)
        self.scoring = self.judging.score or any(o.select == "clip" for o in self.options)
        self.scorer: ScoringClip | None = None
        if self.scoring and not self._reuses_model_clip():
            spec = parse_score_clip(self.judging.score_clip or self.judging.fallback_score_clip or DEFAULT_SCORE_CLIP)
            # A scoring CLIP loaded for an earlier call (the service keeps one) serves again.
            reuse = scorer is not None and scorer.spec == spec and scorer.models_dir == self.captioners[0].models_dir
            self.scorer = scorer if reuse else ScoringClip(spec, self.captioners[0].models_dir)

    # ---- set-up -----------------------------------------------------------------------------
    def _reuses_model_clip(self) -> bool:
        """Scores come from the models' own CLIP (no second image encode) when no scoring CLIP is named
        and every model has the same one: scores of different CLIPs could not be ranked together."""
        if self.judging.score_clip:
            return False
        specs = [getattr(getattr(c, "clip", None), "spec", None) for c in self.captioners]
        return all(spec is not None for spec in specs) and len(set(specs)) == 1

    def load(self, device: torch.device, dtype: torch.dtype) -> "Judge":
        """Load the scoring CLIP (the captioners are loaded by their owner)."""
        if self.scorer is not None:
            self.scorer.load(device, dtype)
        return self

    def preprocessor(self) -> Callable[[Image.Image], Any]:
        """PIL image -> the model's tensor, or a tuple of one tensor per model (and the scoring CLIP)."""
        functions = [captioner.preprocessor() for captioner in self.captioners]
        if self.scorer is not None:
            functions.append(self.scorer.preprocessor())
        return _one_or_all(functions)

    def tensor_preprocessor(self) -> Callable[[torch.Tensor], Any] | None:
        """The same as :meth:`preprocessor` on a decoded uint8 image tensor (GPU JPEG decoding), or
        None when one of the models has no tensor version of its preprocessing."""
        functions = [captioner.tensor_preprocessor() for captioner in self.captioners]
        if self.scorer is not None:
            functions.append(from_transforms(self.scorer.preprocessor()))
        return None if None in functions else _one_or_all(functions)

    @property
    def model_ids(self) -> list[str]:
        return [captioner.spec.id for captioner in self.captioners]

    # ---- judging ----------------------------------------------------------------------------
    def judge_images(self, images: Sequence[Any]) -> list[JudgedImage]:
        """Judge PIL images (any mode) or encoded ones in one batch; each is decoded and preprocessed in
        turn, so only one full-size image is in memory at a time."""
        from captioners.images import EncodedImage, to_rgb

        preprocess = self.preprocessor()
        items = [preprocess(image.decode() if isinstance(image, EncodedImage) else to_rgb(image)) for image in images]
        if isinstance(items[0], tuple):
            return self.judge(tuple(torch.stack(part) for part in zip(*items)))
        return self.judge(torch.stack(items))

    def judge(self, pixels: torch.Tensor | tuple[torch.Tensor, ...]) -> list[JudgedImage]:
        """Judge a batch; ``pixels`` as :meth:`preprocessor` made them, stacked."""
        slots = pixels if isinstance(pixels, tuple) else (pixels,)
        count = slots[0].shape[0]
        pools: list[list[_Candidate]] = [[] for _ in range(count)]
        for index, captioner in enumerate(self.captioners):
            with self._on_device(index):
                made = captioner.caption_candidates(slots[index], self.options[index])
            self._add(pools, made, captioner.spec.id)
        if self.scorer is not None:
            self._score_with_scorer(pools, slots[-1])
        results = [self._pick(pool) for pool in pools]
        self._gate(results)
        if self.judging.on_flag == OnFlag.RETRY:
            self._retry(results, slots)
        elif self.judging.on_flag == OnFlag.SKIP:
            for result in results:
                result.skipped = bool(result.flags and result.flags[0])
        return results

    def _add(self, pools: list[list[_Candidate]], made: Candidates, model: str) -> None:
        groups = [[self._final_text(text) for text in group] for group in made.texts]
        scores: list[list[float | None]] = [[None] * len(group) for group in groups]
        if self.scoring and self.scorer is None:
            if made.image_features is None or made.clip is None:
                raise CaptionerError(f"{model} has no CLIP of its own to score with; name one with score_clip "
                                     "(--score-clip ViT-L-14:openai).")
            scores = score_groups(made.clip, made.image_features, groups)
        for pool, group, group_scores in zip(pools, groups, scores):
            have = {candidate_key(c.text) for c in pool}
            for text, score in zip(group, group_scores):
                key = candidate_key(text)
                if key in have and text:
                    continue
                have.add(key)
                pool.append(_Candidate(text, model, score))

    def _final_text(self, text: str) -> str:
        text = self.shape(text)
        budget = self.judging.max_tokens
        if self.judging.trim_to_budget and budget and self.count_tokens is not None:
            text = trim_to_budget(text, budget, self.count_tokens)
        return text

    def _score_with_scorer(self, pools: list[list[_Candidate]], pixels: torch.Tensor) -> None:
        clip = self.scorer.backbone
        features = clip.encode_images(pixels, normalize=True)
        scores = score_groups(clip, features, [[c.text for c in pool] for pool in pools])
        for pool, values in zip(pools, scores):
            for candidate, value in zip(pool, values):
                candidate.score = value

    def _pick(self, pool: list[_Candidate]) -> JudgedImage:
        keep = max(o.captions_per_image or 1 for o in self.options)
        ranked = pool
        if any(o.select == "clip" for o in self.options):
            ranked = sorted(pool, key=lambda c: -(c.score if c.score is not None else -1.0))  # stable
        chosen = ranked[:keep]
        return JudgedImage([c.text for c in chosen], [c.score for c in chosen], [c.model for c in chosen], [])

    def _gate(self, results: Sequence[JudgedImage]) -> None:
        settings = self.judging.gate_settings()
        for result in results:
            result.flags = [check_caption(text, settings, self.count_tokens, self.count_t5_tokens)
                            for text in result.captions]

    def _retry(self, results: list[JudgedImage], slots: tuple[torch.Tensor, ...]) -> None:
        """Flagged images captioned again by the first model with beam search; the better one kept."""
        flagged = [i for i, result in enumerate(results) if result.flags and result.flags[0]]
        if not flagged:
            return
        captioner, options = self.captioners[0], self.options[0]
        retry_options = options.replace(strategy="beam", candidates=None, captions_per_image=None, select=None)
        index = torch.tensor(flagged)
        try:
            with self._on_device(0):
                made = captioner.caption_candidates(slots[0].index_select(0, index), retry_options)
        except CaptionerError as exc:  # e.g. SBG, which only samples: the first captions stay
            log.info("Retrying flagged captions with beam search is not possible with %s: %s", captioner.spec.id, exc)
            return
        pools: list[list[_Candidate]] = [[] for _ in flagged]
        self._add(pools, made, captioner.spec.id)
        if self.scorer is not None:
            self._score_with_scorer(pools, slots[-1].index_select(0, index))
        for position, pool in zip(flagged, pools):
            if not pool:
                continue
            again = pool[0]
            flags = check_caption(again.text, self.judging.gate_settings(), self.count_tokens, self.count_t5_tokens)
            result = results[position]
            if _better(again.score, flags, result.score, result.flags[0]):
                result.captions[0], result.scores[0], result.models[0], result.flags[0] = (
                    again.text, again.score, again.model, flags)
            result.retried = True

    @contextlib.contextmanager
    def _on_device(self, index: int) -> Iterator[None]:
        """With several models on a GPU, only the one at work is there; the others wait in CPU memory."""
        captioner, home = self.captioners[index], self.homes[index]
        if not self.swap_models or home is None or home.type == "cpu":
            yield
            return
        captioner.to(home)
        try:
            yield
        finally:
            captioner.to("cpu")

    def unload(self) -> None:
        if self.scorer is not None:
            self.scorer.unload()


def planned_scoring_clip(specs: Sequence[Any], options: DecodingOptions, judging: JudgingOptions) -> Any:
    """The ClipSpec of the scoring CLIP a Judge of these (not yet loaded) models will load, or None
    when it will score with the models' own CLIP or not at all: so that its files are checked with
    the models' before anything loads. Mirrors Judge._reuses_model_clip for specs."""
    if not (judging.score or options.select == "clip"):
        return None
    if judging.score_clip:
        return parse_score_clip(judging.score_clip)
    clips = [getattr(spec.config, "clip", None) if spec.family in ("clip-prefix", "sbg") else None for spec in specs]
    own = all(spec.family in ("clip-prefix", "sbg") for spec in specs)
    if own and (len(specs) == 1 or (None not in clips and len(set(clips)) == 1)):
        return None
    return parse_score_clip(judging.fallback_score_clip or DEFAULT_SCORE_CLIP)


def _better(new_score: float | None, new_flags: list[Flag], old_score: float | None, old_flags: list[Flag]) -> bool:
    if new_score is not None and old_score is not None and new_score != old_score:
        return new_score > old_score
    return len(new_flags) < len(old_flags)


def _one_or_all(functions: list[Callable]) -> Callable:
    """The one model's preprocessing, or all of them making a tuple per image."""
    return functions[0] if len(functions) == 1 else MultiPreprocess(functions)


class MultiPreprocess:
    """Several models' preprocessing of one decoded image (picklable for loader processes)."""

    def __init__(self, functions: Sequence[Callable[[Image.Image], torch.Tensor]]):
        self.functions = list(functions)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(function(image) for function in self.functions)


MIN_SCORES_FOR_OUTLIERS = 20  # below this, "the lowest 5%" would flag the lowest caption of any tiny run


def flag_low_scores(results: Sequence[JudgedImage], percentile: float) -> float | None:
    """Add the "low score" flag to the run's lowest-scored first captions; returns the threshold
    (None, and no flag, for runs with fewer than MIN_SCORES_FOR_OUTLIERS scores)."""
    from captioners.judging.gates import score_threshold

    scores = [result.score for result in results]
    if sum(score is not None for score in scores) < MIN_SCORES_FOR_OUTLIERS:
        return None
    threshold = score_threshold(scores, percentile)
    for index in low_score_outliers(scores, percentile):
        result = results[index]
        if result.flags:
            result.flags[0].append(low_score_flag(result.score, threshold))
    return threshold
