"""The run journal: which caption files a job has already changed, so a rerun never changes them twice.

``skip`` needs none: an existing caption is its own record. ``overwrite``, ``append`` and
``prepend`` change existing captions, so rerunning a stopped job would change the finished ones
again (``append``: the caption twice, or a second sampled one). The journal is a hidden JSONL file
named after the job (inputs, policy, text options, model and decoding), in the output folder or the
first input folder. Before a caption file is written it gets a ``writing`` line with the SHA-256 of
its new content, after it a ``done`` line. A rerun of the same job leaves alone every file with a
``done`` line (unless the file is now empty or gone), and every file whose content has the hash of
its ``writing`` line (the run was stopped between writing it and saying so). Exactly once, wherever
the run was killed. Delete the journal to apply the policy to every image again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

from captioners.batch.discovery import real_key
from captioners.batch.job import BatchJob
from captioners.batch.writing import has_caption, read_bytes_no_follow
from captioners.display import json_bytes

log = logging.getLogger(__name__)

PREFIX = ".captioners-journal-"


def job_key(job: BatchJob, model: str, options: dict[str, Any]) -> str:
    """What makes two runs the same job: their images, where captions go and what they become."""
    def real(path: str | None) -> str | None:
        return real_key(Path(path).expanduser()) if path else None

    identity = {"inputs": [real(item) if Path(item).expanduser().exists() else item for item in job.inputs],
                "recursive": job.recursive, "file_list": real(job.file_list), "output_dir": real(job.output_dir),
                "extension": job.extension, "existing": job.existing.value, "separator": job.separator,
                "dedupe_tags": job.dedupe_tags, "shaping": job.to_dict()["shaping"], "model": model,
                "decoding": options}
    # Only when they are not the defaults, so that jobs from before these options keep their journal.
    if job.join:
        identity["join"] = True
    judging = {k: v for k, v in job.judging.to_dict().items() if k in ("score_clip", "trim_to_budget", "on_flag")}
    if judging != {"score_clip": None, "trim_to_budget": False, "on_flag": "keep"}:
        identity["judging"] = judging
    return hashlib.sha256(json_bytes(identity)).hexdigest()[:16]


def journal_folder(job: BatchJob) -> Path:
    """The output folder, else the first input folder (the folder holding a file or a glob's root)."""
    if job.output_dir:
        return Path(job.output_dir).expanduser()
    for item in job.inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            return path
        if path.exists():
            return path.parent
        fixed = [part for part in Path(item).expanduser().parts if not any(c in part for c in "*?[")]
        return Path(*fixed[: len(fixed) - 1]) if len(fixed) > 1 else Path(".")
    return Path(job.file_list).expanduser().parent if job.file_list else Path(".")


def journal_path(job: BatchJob, model: str, options: dict[str, Any]) -> Path:
    return journal_folder(job) / f"{PREFIX}{job_key(job, model, options)}.jsonl"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunJournal:
    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        self.writing: dict[str, str] = {}  # caption file key -> SHA-256 of the content being written
        self._handle: BinaryIO | None = None
        self._read()

    def _read(self) -> None:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("Cannot read the run journal %s (%s); captions it lists may be changed again", self.path, exc)
            return
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: the write it announced is checked by hash instead
            if isinstance(entry, dict) and isinstance(entry.get("done"), str):
                self.done.add(entry["done"])
            elif isinstance(entry, dict) and isinstance(entry.get("writing"), str):
                self.writing[entry["writing"]] = str(entry.get("sha256"))

    @property
    def exists(self) -> bool:
        return bool(self.done or self.writing)

    def finished(self, caption_file: Path) -> bool:
        """Whether an earlier run of this job already wrote this caption file."""
        key = real_key(caption_file)
        if key in self.done:
            return has_caption(caption_file)  # emptied or deleted since: caption it again
        if key in self.writing:
            try:
                return _digest(read_bytes_no_follow(caption_file)) == self.writing[key]
            except OSError:
                return False
        return False

    def will_write(self, caption_file: Path, text: str, durable: bool) -> None:
        """Recorded before the write, so a kill right after it still counts the file as done."""
        self._append({"writing": real_key(caption_file), "sha256": _digest(text.encode("utf-8"))}, durable)

    def wrote(self, caption_file: Path) -> None:
        self._append({"done": real_key(caption_file)}, durable=False)

    def _append(self, entry: dict[str, str], durable: bool) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "ab")
        self._handle.write(json_bytes(entry) + b"\n")
        self._handle.flush()
        if durable:  # the caption write that follows is made durable too; its record must be first
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
