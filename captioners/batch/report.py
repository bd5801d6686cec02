"""What a run tells its caller: progress after every batch, and a summary at the end."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

RECENT = 8    # captions shown in Progress.recent
PREVIEWS = 8  # first captions kept in BatchSummary.previews
FLAGGED_SHOWN = 1000  # flagged captions listed in the summary (the HTML report and JSONL have all)


@dataclass
class Progress:
    done: int              # images dealt with: captioned + skipped + resumed + failed
    total: int
    captioned: int
    skipped: int           # existing captions kept, and files an earlier run of the job finished
    failed: int
    elapsed_s: float
    images_per_s: float    # images captioned or failed per second of captioning (skips excluded)
    eta_s: float | None
    recent: list[tuple[str, str]] = field(default_factory=list)  # (image path, caption), latest batch


@dataclass
class BatchSummary:
    captioned: int = 0                                          # dry run: captions that would be written
    skipped: int = 0                                            # existing captions left alone
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    changes: list[dict[str, Any]] = field(default_factory=list)  # dry run: what would be written
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    interrupted: bool = False
    previews: list[tuple[str, str]] = field(default_factory=list)  # (image path, caption), first ones
    written: list[str] = field(default_factory=list)     # caption files and combined outputs written
    backups: list[str] = field(default_factory=list)     # copies of replaced files
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, message), e.g. long captions
    total: int = 0
    dry_run: bool = False
    resumed: int = 0                                   # done by an earlier run of this job (the journal)
    journal: str | None = None                         # the run journal (append, prepend, overwrite)
    # Combined outputs or the report that could not be written: (path, reason). The captions are written.
    output_failures: list[tuple[str, str]] = field(default_factory=list)
    # Quality gates (see captioners/judging): captions flagged per gate, the flagged ones (the first
    # FLAGGED_SHOWN of flagged_total) with what was done, images not written because of on_flag skip.
    flags: dict[str, int] = field(default_factory=dict)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    flagged_total: int = 0
    flag_skipped: int = 0
    clip_score: dict[str, float] | None = None       # mean, median, min, max, count of the run's CLIPScores
    low_score_threshold: float | None = None         # CLIPScores at or below it are flagged low_score
    report_html: str | None = None                   # the dataset report written
    dataset: dict[str, Any] | None = None            # its numbers (with report / report_html): see judging/dataset_report
    stages: dict[str, Any] | None = None             # local engine: StageTimes.to_dict() (batch size, data wait)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: tuples become [path, text] lists."""
        return asdict(self)


class Tracker:
    """Counts, rate and ETA. The rate leaves out skipped images (they cost nothing)."""

    def __init__(self, summary: BatchSummary, started: float):
        self.summary = summary
        self.started = started
        self.loop_started: float | None = None
        self.processed = 0  # images captioned or failed since the loop started
        self.recent: list[tuple[str, str]] = []

    def start_loop(self) -> None:
        self.loop_started = time.perf_counter()

    def rate(self) -> float:
        if self.loop_started is None or not self.processed:
            return 0.0
        return self.processed / max(time.perf_counter() - self.loop_started, 1e-9)

    def progress(self) -> Progress:
        s = self.summary
        done = s.captioned + s.skipped + s.resumed + len(s.failed)
        rate = self.rate()
        eta = (s.total - done) / rate if rate else (0.0 if done >= s.total else None)
        return Progress(done, s.total, s.captioned, s.skipped + s.resumed, len(s.failed),
                        time.perf_counter() - self.started, rate, eta, list(self.recent))

    def finish(self) -> BatchSummary:
        self.summary.elapsed_s = time.perf_counter() - self.started
        self.summary.images_per_s = self.rate()
        return self.summary


@dataclass
class StageTimes:
    """Where the local engine's run loop spent its time, summed over batches: waiting for decoded
    images, captioning them (the model; its results are on the host by then, so GPU work is done),
    and writing the caption files. ``data_wait`` is the waiting share: on a GPU, the fraction of the
    time the GPU had no batch to work on."""

    batch_size: int = 0
    batches: int = 0
    waiting_s: float = 0.0
    captioning_s: float = 0.0
    writing_s: float = 0.0

    @property
    def data_wait(self) -> float | None:
        total = self.waiting_s + self.captioning_s + self.writing_s
        return self.waiting_s / total if total > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "data_wait": self.data_wait}
