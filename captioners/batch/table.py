"""The result table of a distributed run: one row per image (see steps.TABLE_COLUMNS), in shards.

Each shard is written whole (a temporary file, then a rename), so a run killed at any point leaves
complete shards only. Reading keeps one row per image id: a caption beats an earlier failure (a
rerun tries failed images again), and among equals the newest shard wins. Rows made under other
options (another ``options_hash``) are never taken for this job's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from captioners.display import display_path
from captioners.errors import CaptionerError

FORMATS = ("parquet", "jsonl")
SHARD_PREFIX = "part-"


def arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("path", pa.string()), ("caption", pa.string()),
                      ("captions", pa.list_(pa.string())), ("score", pa.float64()), ("scores", pa.list_(pa.float64())),
                      ("model", pa.string()), ("options_hash", pa.string()), ("error", pa.string()),
                      ("judged", pa.string())])


class ResultTable:
    def __init__(self, folder: Path, table_format: str = "parquet"):
        if table_format not in FORMATS:
            raise CaptionerError(f"--table-format must be one of {', '.join(FORMATS)} (got {table_format!r}).")
        self.folder, self.format = folder, table_format
        self.shards_written = 0

    def shards(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        # Both formats are read: a rerun may name the other one.
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(SHARD_PREFIX)
                      and p.suffix in (".parquet", ".jsonl"))

    def rows(self, options_hash: str) -> dict[str, dict[str, Any]]:
        """image id -> its row made under these options (see the module docstring)."""
        best: dict[str, dict[str, Any]] = {}
        for shard in self.shards():
            for row in _read_shard(shard):
                if row.get("options_hash") != options_hash:
                    continue
                old = best.get(row["id"])
                if old is None or not row.get("error") or old.get("error"):
                    best[row["id"]] = row
        return best

    def prepare(self) -> None:
        """Make the folder now: a table that cannot be written stops the run before any captioning."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CaptionerError(f"Cannot write the result table in {display_path(self.folder)}: "
                                 f"{exc.strerror or exc}; choose another --table-dir.") from exc

    def append(self, rows: list[dict[str, Any]]) -> Path | None:
        """Write ``rows`` as one new shard. A shard that cannot be written ends the run (with what was
        written so far kept): going on would caption images that no rerun could resume from."""
        if not rows:
            return None
        try:
            return self._write(rows)
        except OSError as exc:
            raise CaptionerError(f"Cannot write the result table in {display_path(self.folder)}: "
                                 f"{exc.strerror or exc}. Captions so far are kept; rerun to go on.") from exc

    def _write(self, rows: list[dict[str, Any]]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Shards sort in writing order: the time first, then the process.
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{self.shards_written:06d}.{self.format}"
        target = self.folder / name
        temporary = self.folder / f".{name}.tmp"
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), temporary)
        else:
            temporary.write_bytes(b"".join(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in rows))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        self.shards_written += 1
        return target


def _read_shard(path: Path) -> Iterable[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
