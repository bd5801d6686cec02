"""The batch run loop: plan, decode in workers, caption in batches, write, report.

Every image ends up captioned, skipped (an existing caption under the skip policy, or a caption file
an earlier run of this very job already wrote: see journal.py) or failed with a reason; nothing an
image can do ends the run. ``should_stop`` is asked between batches, so a stopped run has written
whole caption files only, and its combined outputs and report still get written; an output that
cannot be written is listed in the summary rather than raised.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from captioners.base import Captioner
from captioners.batch.discovery import Discovery, Planned, plan_images
from captioners.batch.job import BatchJob, ExistingPolicy
from captioners.batch.local_engine import LocalEngine, Outcome
from captioners.batch.journal import RunJournal, journal_folder, journal_path
from captioners.batch.outputs import CombinedOutputs, Record, check_output_paths, read_kohya_metadata, write_output
from captioners.batch.report import PREVIEWS, RECENT, BatchSummary, Progress, StageTimes, Tracker
from captioners.batch.writing import (decide, has_caption, read_bytes_no_follow, read_existing,
                                      remove_stale_temp_files, write_caption)
from captioners.batch.judged import RunJudgement
from captioners.batch.steps import options_hash
from captioners.display import display_path, json_bytes
from captioners.errors import CaptionerError
from captioners.judging.judge import JudgedImage

log = logging.getLogger(__name__)


def plan_job(job: BatchJob) -> Discovery:
    """The job's images and caption files, with every output checked; a CaptionerError when the run
    cannot start (nothing to caption, an output that would replace an input or cannot be written).
    Meant to run before the model loads."""
    job.validate()
    plan = plan_images(job.inputs, job.recursive, job.file_list, job.extension, job.output_dir)
    if not plan.items and not plan.failed:
        if not job.inputs and not job.file_list:
            raise CaptionerError("No inputs given: name folders, images or glob patterns, or a file list.")
        sources = ", ".join(map(display_path, job.inputs + ([f"file list {job.file_list}"] if job.file_list else [])))
        raise CaptionerError(f"No images found in {sources}" + ("" if job.recursive else
                             " (sub-folders are searched only with -r/--recursive; in the tab: Include "
                             "sub-folders; in the API: \"recursive\": true)"))
    outputs = {"jsonl": job.jsonl, "csv": job.csv, "kohya_json": job.kohya_json, "report": job.report,
               "report_html": job.report_html}
    journaled = job.existing != ExistingPolicy.SKIP and not job.dry_run
    check_output_paths(outputs, plan, folders=(journal_folder(job),) if journaled else ())
    if job.kohya_json:
        read_kohya_metadata(Path(job.kohya_json).expanduser())  # a file that cannot be merged into stops here
    return plan


def run_batch(captioner: Captioner | Sequence[Captioner], job: BatchJob,
              on_progress: Callable[[Progress], None] | None = None,
              should_stop: Callable[[], bool] | None = None, plan: Discovery | None = None,
              swap_models: bool = False, engine: Engine | None = None) -> BatchSummary:
    """Caption every image of ``job``; see the module docstring and README "Batch captioning".

    Several captioners make candidates together (best-of-N across models); ``swap_models`` keeps
    only the one at work on the GPU. ``engine`` makes the captions (default: this process, see
    local_engine.py; ray_engine.py spreads them over a cluster); everything else is done here."""
    captioners = [captioner] if isinstance(captioner, Captioner) else list(captioner)
    run = _Run(captioners, job, plan or plan_job(job), on_progress, should_stop, swap_models,
               engine or LocalEngine())
    return run.execute()


class Engine(Protocol):
    """Makes the outcomes of the images left to caption, a batch at a time (see local_engine.py)."""

    name: str

    def caption(self, todo: Sequence[Planned], captioners: Sequence[Captioner], job: BatchJob,
                judgement: RunJudgement, model_id: str, key: str) -> Iterator[list[Outcome]]: ...


class _Run:
    def __init__(self, captioners: list[Captioner], job: BatchJob, plan: Discovery,
                 on_progress: Callable[[Progress], None] | None, should_stop: Callable[[], bool] | None,
                 swap_models: bool, engine: Engine):
        self.captioners, self.job, self.plan, self.engine = captioners, job, plan, engine
        self.captioner = captioners[0]
        self.on_progress, self.should_stop = on_progress, should_stop
        self.summary = BatchSummary(total=len(plan.items) + len(plan.failed), dry_run=job.dry_run,
                                    failed=list(plan.failed))
        self.tracker = Tracker(self.summary, time.perf_counter())
        self.options = self.captioner.decoding_options(job.decoding)
        self.model_id = ",".join(c.spec.id for c in captioners)
        self.key = options_hash(job, self.model_id, self.options.to_dict())
        self.outputs = CombinedOutputs(job.jsonl, job.csv, job.kohya_json, job.kohya_full_path,
                                       self.model_id, self.options.to_dict())
        self.journal = None
        if job.existing != ExistingPolicy.SKIP and not job.dry_run:
            self.journal = RunJournal(journal_path(job, self.model_id, self.options.to_dict()))
            self.summary.journal = str(self.journal.path)
        self.judgement = RunJudgement(captioners, job, swap_models)

    def execute(self) -> BatchSummary:
        if not self.job.dry_run:
            for folder in sorted({item.caption_file.parent for item in self.plan.items}):
                remove_stale_temp_files(folder)
        todo = self._skip_captioned()
        self._report()
        try:
            if todo and not self._stop_requested():
                self._caption_all(todo)
        finally:
            if self.journal is not None:
                self.journal.close()
            self.judgement.finish(self.summary)
            self._write_outputs()
        return self.tracker.finish()

    # ---- planning --------------------------------------------------------------------------
    def _skip_captioned(self) -> list[Planned]:
        """Images left to caption. Not even decoded: under skip, ones with a non-empty caption file;
        under the other policies, ones an earlier run of this very job already wrote (the journal)."""
        todo = []
        for item in self.plan.items:
            if self.job.existing == ExistingPolicy.SKIP and has_caption(item.caption_file):
                self._skipped(item)
            elif self.journal is not None and self.journal.finished(item.caption_file):
                self._skipped(item, resumed=True)
            else:
                todo.append(item)
        return todo

    def _skipped(self, item: Planned, resumed: bool = False) -> None:
        if resumed:
            self.summary.resumed += 1
        else:
            self.summary.skipped += 1
        if self.outputs.enabled or self.judgement.wants_kept_captions:
            try:
                text = read_existing(item.caption_file)[1] or ""
            except (OSError, UnicodeDecodeError):
                return
            self.outputs.add(Record(item.index, item.image, item.caption_file, text.strip(), new=False))
            if self.judgement.wants_kept_captions:
                self.judgement.add_kept(item, text)

    # ---- captioning ------------------------------------------------------------------------
    def _caption_all(self, todo: list[Planned]) -> None:
        self.tracker.start_loop()
        batches = self.engine.caption(todo, self.captioners, self.job, self.judgement, self.model_id, self.key)
        writing_s = 0.0
        try:
            for outcomes in batches:
                started = time.perf_counter()
                self._take(outcomes, todo)
                writing_s += time.perf_counter() - started
                self._report()
                if self._stop_requested():
                    self.summary.interrupted = True
                    break
        finally:
            batches.close()
            times = getattr(self.engine, "times", None)  # the local engine's (see StageTimes)
            if isinstance(times, StageTimes):
                times.writing_s = writing_s
                self.summary.stages = times.to_dict()

    def _take(self, outcomes: list[Outcome], todo: list[Planned]) -> None:
        self.tracker.recent = []
        for index, outcome in outcomes:
            if isinstance(outcome, str):
                self._fail(todo[index], outcome)
            else:
                self._finish(todo[index], outcome)
        self.tracker.recent = self.tracker.recent[-RECENT:]

    def _finish(self, item: Planned, result: JudgedImage) -> None:
        """Apply the existing-caption policy to the judged (already shaped) captions and write them
        (or, dry run, record what would be written)."""
        job, summary = self.job, self.summary
        self.judgement.add(item, result)
        if result.skipped:  # on_flag skip: nothing is written for it
            summary.flag_skipped += 1
            self.tracker.processed += 1
            return
        text = self.judgement.file_text(result)
        try:
            old_bytes, old = read_existing(item.caption_file)
        except UnicodeDecodeError:
            if job.existing in (ExistingPolicy.APPEND, ExistingPolicy.PREPEND):
                self._fail(item, f"existing caption file {item.caption_file} is not UTF-8 text; "
                                 "convert it to UTF-8 or use the overwrite policy")
                return
            old_bytes = read_bytes_no_follow(item.caption_file)
            old = old_bytes.decode("utf-8", errors="replace")
        except OSError as exc:
            self._fail(item, f"cannot read the existing caption file {display_path(item.caption_file)}: "
                             f"{exc.strerror or exc}")
            return
        decision = decide(old, text, job.existing, job.separator, job.dedupe_tags)
        if decision.action == "skip":  # a caption appeared since planning (e.g. another run)
            self._skipped(item)
            return
        if job.dry_run:
            summary.changes.append({"image": str(item.image), "caption_file": str(item.caption_file),
                                    "action": decision.action, "old": decision.old, "new": decision.text})
        elif decision.action != "unchanged":
            replacing = bool(old_bytes and old_bytes.strip())
            try:
                if self.journal is not None:
                    self.journal.will_write(item.caption_file, decision.text, durable=replacing)
                backup = write_caption(item.caption_file, decision.text, old_bytes, job.backup)
                if self.journal is not None:
                    self.journal.wrote(item.caption_file)
            except OSError as exc:
                self._fail(item, f"cannot write {display_path(exc.filename or item.caption_file)}: "
                                 f"{exc.strerror or exc}")
                return
            summary.written.append(str(item.caption_file))
            if backup:
                summary.backups.append(str(backup))
        summary.captioned += 1
        self.tracker.processed += 1
        self._check_length(item, result)
        self.outputs.add(Record(item.index, item.image, item.caption_file, decision.text, new=True, judged=result))
        self.tracker.recent.append((str(item.image), decision.text))
        if len(summary.previews) < PREVIEWS:
            summary.previews.append((str(item.image), decision.text))

    def _check_length(self, item: Planned, result: JudgedImage) -> None:
        """Over-budget captions are also warnings (the gates flag them as well)."""
        for flags in result.flags:
            for flag in flags:
                if flag.code in ("over_budget", "over_t5_budget"):
                    self.summary.warnings.append((str(item.caption_file), flag.message))

    def _fail(self, item: Planned, reason: str) -> None:
        log.debug("Failed %s: %s", item.image, reason)
        self.summary.failed.append((str(item.image), reason))
        self.tracker.processed += 1

    # ---- reporting -------------------------------------------------------------------------
    def _report(self) -> None:
        if self.on_progress:
            self.on_progress(self.tracker.progress())

    def _stop_requested(self) -> bool:
        return bool(self.should_stop and self.should_stop())

    def _write_outputs(self) -> None:
        job, summary = self.job, self.summary
        if job.dry_run:
            summary.changes += [{"image": None, "caption_file": str(path), "action": "write", "old": None,
                                 "new": f"{len(self.outputs.records)} captions"} for path in self.outputs.paths]
            return
        if self.outputs.enabled:
            written, backups, warnings, failures = self.outputs.write(job.backup)
            summary.written += [str(p) for p in written]
            summary.backups += [str(p) for p in backups]
            summary.warnings += [(str(self.outputs.kohya), w) for w in warnings]
            summary.output_failures += failures
        self._write_html_report()
        if job.report:  # last, so that it lists what the other outputs did
            self.tracker.finish()
            path = Path(job.report).expanduser()
            report = {"job": job.to_dict(), "model": self.model_id, "summary": summary.to_dict()}
            try:
                backup = write_output(path, json_bytes(report, indent=2) + b"\n", job.backup)
            except OSError as exc:
                summary.output_failures.append((str(path), f"cannot write it: {exc.strerror or exc}"))
                return
            summary.written.append(str(path))
            summary.backups += [str(backup)] if backup else []

    def _write_html_report(self) -> None:
        if not self.job.report_html:
            return
        path = Path(self.job.report_html).expanduser()
        try:
            backup = write_output(path, self.judgement.html().encode("utf-8"), self.job.backup)
        except OSError as exc:
            self.summary.output_failures.append((str(path), f"cannot write it: {exc.strerror or exc}"))
            return
        self.summary.written.append(str(path))
        self.summary.report_html = str(path)
        self.summary.backups += [str(backup)] if backup else []
