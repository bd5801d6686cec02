"""The judging side of a batch run: the Judge of every batch, and what the run learns about its captions.

It builds the :class:`~captioners.judging.judge.Judge` once the models are loaded (shaping, token
counters, scoring CLIP), keeps one small record per image (first caption, scores, flags, tokens),
and at the end flags the run's lowest CLIPScores, fills the summary's gate counts and flagged list,
and makes the dataset report's numbers and HTML.
"""

from __future__ import annotations

import logging
from functools import partial
from statistics import mean, median
from typing import Any, Callable, Sequence

import torch

from captioners.base import Captioner
from captioners.batch.discovery import Planned
from captioners.batch.job import BatchJob
from captioners.batch.report import FLAGGED_SHOWN, BatchSummary
from captioners.batch.shaping import clip_token_counter, shape_caption
from captioners.judging.dataset_report import (ReportRecord, dataset_numbers, exact_duplicate_groups,
                                               near_duplicate_pairs, render_html)
from captioners.judging.gates import GATE_CODES, GateSettings, check_caption
from captioners.judging.judge import Judge, JudgedImage, flag_low_scores

log = logging.getLogger(__name__)

NEAR_DUPLICATE_COSINE = 0.95  # text-embedding cosine above which two captions count as near-duplicates


class RunJudgement:
    def __init__(self, captioners: Sequence[Captioner], job: BatchJob, swap_models: bool = False):
        self.captioners, self.job, self.swap_models = list(captioners), job, swap_models
        self.judge: Judge | None = None
        self.count_tokens: Callable[[str], int] | None = None
        self.results: list[tuple[Planned, JudgedImage]] = []
        self.numbers: dict[str, Any] | None = None
        self.records: list[ReportRecord] = []
        self.kept: list[tuple[Planned, str]] = []  # captions the run kept (skip policy, journal): in the report

    @property
    def wants_kept_captions(self) -> bool:
        """The report describes the whole dataset, the captions a run keeps included."""
        return bool(self.job.report_html or self.job.report)

    def add_kept(self, item: Planned, text: str) -> None:
        self.kept.append((item, text))

    def _counter(self) -> Callable[[str], int] | None:
        if self.count_tokens is None and (self.job.judging.max_tokens or self.wants_kept_captions):
            self.count_tokens = clip_token_counter()
        return self.count_tokens

    def start(self) -> Judge:
        """The Judge for this run's batches (the captioners are loaded)."""
        if self.judge is None:
            job = self.job
            self._counter()
            count_t5 = None
            if job.judging.t5_max_tokens:
                from captioners.judging.budgets import t5_token_counter

                count_t5 = t5_token_counter(self.captioners[0].models_dir)
            self.judge = Judge(self.captioners, job.decoding, job.judging, partial(shape_caption, shaping=job.shaping),
                               self.count_tokens, count_t5, swap_models=self.swap_models)
            first = self.captioners[0]
            self.judge.load(first.device, first.dtype)
        return self.judge

    def add(self, item: Planned, result: JudgedImage) -> None:
        self.results.append((item, result))

    def file_text(self, result: JudgedImage) -> str:
        """The caption file's text: one caption per line (random-line trainers), or joined on one line."""
        return (self.job.separator if self.job.join else "\n").join(result.captions)

    # ---- the end of the run -----------------------------------------------------------------
    def finish(self, summary: BatchSummary) -> None:
        judged = [result for _, result in self.results]
        if judged:
            self._summarize(summary, judged)
        if self.wants_kept_captions and (self.results or self.kept):
            self._counter()
            self.records = sorted([*(self._record(item, result) for item, result in self.results),
                                   *(self._kept_record(item, text) for item, text in self.kept)],
                                  key=lambda record: record.image)
            self.numbers = summary.dataset = self._numbers(self.records)

    def _summarize(self, summary: BatchSummary, judged: list[JudgedImage]) -> None:
        """Low-score flags, the run's CLIPScores, counts per gate and the flagged captions."""
        if any(result.score is not None for result in judged):
            summary.low_score_threshold = flag_low_scores(judged, GateSettings().low_score_percentile)
            scores = [result.score for result in judged if result.score is not None]
            summary.clip_score = {"mean": round(mean(scores), 4), "median": round(median(scores), 4),
                                  "min": min(scores), "max": max(scores), "count": len(scores)}
        summary.flags = {code: sum(code in result.flag_codes for result in judged) for code in GATE_CODES}
        flagged = [(item, result) for item, result in self.results if result.flag_codes]
        summary.flagged_total = len(flagged)
        summary.flagged = [_flagged_entry(item, result) for item, result in flagged[:FLAGGED_SHOWN]]

    def _record(self, item: Planned, result: JudgedImage) -> ReportRecord:
        tokens = self.count_tokens(result.caption) if self.count_tokens else None
        return ReportRecord(str(item.image), list(result.captions), list(result.scores), result.flag_codes, tokens)

    def _kept_record(self, item: Planned, text: str) -> ReportRecord:
        """A caption kept from before: counted and gated like new ones (one caption per line), not scored."""
        captions = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        flags = check_caption(captions[0], self.job.judging.gate_settings(), self.count_tokens)
        tokens = self.count_tokens(captions[0]) if self.count_tokens else None
        return ReportRecord(str(item.image), captions, [None] * len(captions), [flag.code for flag in flags], tokens)

    def _numbers(self, records: list[ReportRecord]) -> dict[str, Any]:
        exact = exact_duplicate_groups(records)
        features = self._text_features([record.captions[0] if record.captions else "" for record in records])
        near = near_duplicate_pairs(features, NEAR_DUPLICATE_COSINE, exact) if features is not None else []
        return dataset_numbers(records, near, exact)

    def _text_features(self, texts: list[str]) -> torch.Tensor | None:
        """Text embeddings for near-duplicates, from the scoring CLIP or the model's own (none: FuseCap unscored)."""
        clip = None
        if self.judge is not None and self.judge.scorer is not None:
            clip = self.judge.scorer.backbone
        clip = clip or next((c.clip for c in self.captioners if getattr(c, "clip", None) is not None), None)
        if clip is None:
            return None
        with torch.inference_mode():
            return clip.encode_texts(texts).cpu()

    def html(self) -> str:
        if self.numbers is None:
            self.numbers = dataset_numbers([])
        return render_html(self.numbers, self.records, title=f"Captioning report: {len(self.records)} images")


def _flagged_entry(item: Planned, result: JudgedImage) -> dict[str, Any]:
    flags = result.flags[0] if result.flags else []
    action = "skipped" if result.skipped else "retried" if result.retried else "kept"
    return {"image": str(item.image), "caption": result.caption, "clip_score": result.score,
            "flags": [flag.code for flag in flags], "messages": [flag.message for flag in flags], "action": action}
