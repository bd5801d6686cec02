"""Combined outputs beside the caption files: JSONL, CSV and kohya's fine-tuning metadata JSON.

They list every image of the job that has a caption after the run: the new ones and, so that a
resumed run still yields complete files, the captions kept by the skip policy. Each file is written
atomically at the end of the run (also when it was stopped); a file that cannot be written is
reported with its reason, and the others are still written. kohya's JSON is merged: other entries,
and other fields of updated entries, are kept.

:func:`check_output_paths` runs before the model loads: every output (and the report) must be
writable, and none may be an input image, a caption file of the run or another output.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioners.batch.discovery import Discovery, real_key
from captioners.batch.remote import RemoteFile
from captioners.batch.writing import replace_file
from captioners.display import display_path, json_bytes
from captioners.errors import CaptionerError

log = logging.getLogger(__name__)


@dataclass
class Record:
    index: int
    image: Path | RemoteFile
    caption_file: Path
    caption: str
    new: bool  # captioned in this run (False: an existing caption that was kept)
    judged: Any = None  # the JudgedImage of a new caption: its captions, scores, models and flags


class CombinedOutputs:
    def __init__(self, jsonl: str | None, csv_path: str | None, kohya_json: str | None,
                 kohya_full_path: bool, model: str, options: dict[str, Any]):
        self.jsonl = Path(jsonl).expanduser() if jsonl else None
        self.csv = Path(csv_path).expanduser() if csv_path else None
        self.kohya = Path(kohya_json).expanduser() if kohya_json else None
        self.kohya_full_path = kohya_full_path
        self.model = model
        self.options = options
        self.records: dict[int, Record] = {}
        self.kohya_existing = read_kohya_metadata(self.kohya) if self.kohya else {}

    @property
    def enabled(self) -> bool:
        return any((self.jsonl, self.csv, self.kohya))

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.jsonl, self.csv, self.kohya) if p]

    def add(self, record: Record) -> None:
        if self.enabled:
            self.records[record.index] = record

    def write(self, backup: bool) -> tuple[list[Path], list[Path], list[str], list[tuple[str, str]]]:
        """Write every enabled file; returns (written, backups, warnings, failures as (path, reason))."""
        records = [self.records[i] for i in sorted(self.records)]
        contents: list[tuple[Path, bytes]] = []
        warnings: list[str] = []
        if self.jsonl:
            contents.append((self.jsonl, self._jsonl(records)))
        if self.csv:
            contents.append((self.csv, self._csv(records)))
        if self.kohya:
            data, warnings = self._kohya(records)
            contents.append((self.kohya, data))
        written, backups, failures = [], [], []
        for path, data in contents:
            try:
                made = write_output(path, data, backup)
            except OSError as exc:  # disk full, a folder in the way: the other outputs still get written
                failures.append((str(path), f"cannot write it: {exc.strerror or exc}"))
                continue
            written.append(path)
            backups += [made] if made else []
        return written, backups, warnings, failures

    def _jsonl(self, records: list[Record]) -> bytes:
        lines = []
        for r in records:
            item = {"path": str(r.image), "caption": r.caption, "caption_file": str(r.caption_file),
                    "model": self.model if r.new else None, "options": self.options if r.new else None,
                    "new": r.new}
            if r.judged is not None:  # every caption with its score, model and flags
                item["clip_score"] = r.judged.score
                item["flags"] = r.judged.flag_codes
                item["captions"] = r.judged.to_dict()["captions"]
            lines.append(json_bytes(item))  # a name with bytes that are not UTF-8 stays exact (\udcXX)
        return b"".join(line + b"\n" for line in lines)

    def _csv(self, records: list[Record]) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        scored = any(r.judged is not None and r.judged.score is not None for r in records)
        writer.writerow(["path", "caption", "model"] + (["clip_score", "flags"] if scored else []))
        for r in records:  # CSV has no escapes: undecodable bytes are shown as \xNN
            row = [display_path(r.image), r.caption, self.model if r.new else ""]
            if scored:
                judged = r.judged
                row += ["" if judged is None or judged.score is None else f"{judged.score:.4f}",
                        " ".join(judged.flag_codes) if judged is not None else ""]
            writer.writerow(row)
        return buffer.getvalue().encode("utf-8")

    def _kohya(self, records: list[Record]) -> tuple[bytes, list[str]]:
        try:  # re-read: the file may have changed during a long run
            metadata = read_kohya_metadata(self.kohya)
        except CaptionerError as exc:
            log.warning("%s; merging into its content from the start of the run", exc)
            metadata = dict(self.kohya_existing)
        owners: dict[str, Path | RemoteFile] = {}
        warnings = []
        for r in records:
            full = str(r.image) if isinstance(r.image, RemoteFile) else str(r.image.resolve())
            key = full if self.kohya_full_path else r.image.stem
            if key in owners:
                warnings.append(f"kohya metadata key {key!r} is shared by {owners[key]} and {r.image}; "
                                "the latter is kept (--kohya-full-path, or kohya_full_path in the API, gives unique keys)")
            owners[key] = r.image
            entry = metadata.get(key)
            entry = dict(entry) if isinstance(entry, dict) else {}
            entry["caption"] = r.caption
            metadata[key] = entry
        return json_bytes(metadata, indent=2) + b"\n", warnings


def read_kohya_metadata(path: Path) -> dict[str, Any]:
    """An existing metadata file to merge into; an unreadable one stops the run before it starts."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionerError(f"Cannot merge into {path}: it is not readable JSON ({exc}). "
                             "Fix or move it, or choose another kohya_json file.") from exc
    if not isinstance(data, dict):
        raise CaptionerError(f"Cannot merge into {path}: kohya metadata must be a JSON object "
                             "{image_key: {\"caption\": ...}}. Choose another kohya_json file.")
    return data


def write_output(path: Path, data: bytes, backup: bool) -> Path | None:
    """Replace ``path`` atomically, keeping a numbered backup of a non-empty old file; the backup made."""
    return replace_file(path, data, path.read_bytes() if path.is_file() else None, backup)


# Job field -> its command-line flag, for messages.
OUTPUT_FLAGS = {"jsonl": "--jsonl", "csv": "--csv", "kohya_json": "--kohya-json", "report": "--report",
                "report_html": "--report-html"}


def check_output_paths(outputs: dict[str, str | None], plan: Discovery, folders: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, outputs that would replace an input image, a caption file of this run
    or another output (compared by real path, hard links included), or that cannot be written.
    ``folders`` are further folders the run writes into (e.g. the run journal's)."""
    seen: dict[str, str] = {}
    for field, value in outputs.items():
        if not value:
            continue
        path, name = Path(value).expanduser(), f"{field} ({OUTPUT_FLAGS[field]}) {display_path(value)}"
        key = real_key(path)
        if key in seen:
            raise CaptionerError(f"{name} is the same file as {seen[key]}: give each output its own file.")
        seen[key] = name
        owner = _input_owning(path, key, plan)
        if owner:
            raise CaptionerError(f"{name} is {owner} of this run; writing it would destroy it: choose another file.")
        if path.is_dir():
            raise CaptionerError(f"{name} is a folder: give a file name.")
        _check_folder(name, path.parent)
    for folder in folders:
        _check_folder(f"the folder {display_path(folder)}", folder)


def _input_owning(path: Path, key: str, plan: Discovery) -> str | None:
    if key in plan.image_keys:
        return "an input image"
    if key in plan.caption_owners:
        return f"the caption file of {display_path(plan.caption_owners[key])}"
    try:
        stat = path.stat()
    except OSError:
        return None
    if stat.st_nlink > 1:  # another name of the same file: only then is every input worth a stat
        same = (stat.st_dev, stat.st_ino)
        for other in [*plan.image_keys, *plan.caption_owners]:
            try:
                other_stat = os.stat(other)
            except OSError:
                continue
            if (other_stat.st_dev, other_stat.st_ino) == same:
                return "a hard link to an input image or a caption file"
    return None


def _check_folder(name: str, folder: Path) -> None:
    """The nearest existing folder above (missing ones are made at write time) is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CaptionerError(f"Cannot write {name}: {display_path(existing)} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CaptionerError(f"Cannot write {name}: the folder {display_path(existing)} is not writable.")
