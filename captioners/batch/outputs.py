"""Combined outputs beside the caption files: JSONL, CSV and kohya's fine-tuning metadata JSON.

They list every image of the job that has a caption after the run: the new ones and, so that a
resumed run still yields complete files, the captions kept by the skip policy. Each file is written
atomically at the end of the run (also when it was stopped). kohya's JSON is merged: other entries,
and other fields of updated entries, are kept.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioners.batch.writing import atomic_write, free_backup_path
from captioners.errors import CaptionerError

log = logging.getLogger(__name__)


@dataclass
class Record:
    index: int
    image: Path
    caption_file: Path
    caption: str
    new: bool  # captioned in this run (False: an existing caption that was kept)


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

    def write(self, backup: bool) -> tuple[list[Path], list[Path], list[str]]:
        """Write every enabled file; returns (written, backups, warnings)."""
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
        written, backups = [], []
        for path, data in contents:
            path.parent.mkdir(parents=True, exist_ok=True)
            if backup and path.is_file() and path.stat().st_size:
                backups.append(free_backup_path(path))
                atomic_write(backups[-1], path.read_bytes())
            atomic_write(path, data)
            written.append(path)
        return written, backups, warnings

    def _jsonl(self, records: list[Record]) -> bytes:
        lines = []
        for r in records:
            item = {"path": str(r.image), "caption": r.caption, "caption_file": str(r.caption_file),
                    "model": self.model if r.new else None, "options": self.options if r.new else None,
                    "new": r.new}
            lines.append(json.dumps(item, ensure_ascii=False))
        return ("\n".join(lines) + "\n" if lines else "").encode("utf-8")

    def _csv(self, records: list[Record]) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "caption", "model"])
        for r in records:
            writer.writerow([str(r.image), r.caption, self.model if r.new else ""])
        return buffer.getvalue().encode("utf-8")

    def _kohya(self, records: list[Record]) -> tuple[bytes, list[str]]:
        try:  # re-read: the file may have changed during a long run
            metadata = read_kohya_metadata(self.kohya)
        except CaptionerError as exc:
            log.warning("%s; merging into its content from the start of the run", exc)
            metadata = dict(self.kohya_existing)
        owners: dict[str, Path] = {}
        warnings = []
        for r in records:
            key = str(r.image.resolve()) if self.kohya_full_path else r.image.stem
            if key in owners:
                warnings.append(f"kohya metadata key {key!r} is shared by {owners[key]} and {r.image}; "
                                "the latter is kept (use kohya_full_path for unique keys)")
            owners[key] = r.image
            entry = metadata.get(key)
            entry = dict(entry) if isinstance(entry, dict) else {}
            entry["caption"] = r.caption
            metadata[key] = entry
        return (json.dumps(metadata, ensure_ascii=False, indent=2) + "\n").encode("utf-8"), warnings


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
