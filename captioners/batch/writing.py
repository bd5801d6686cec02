"""Caption files are written so that no caption is ever lost or half-written.

- Atomic: the text goes to a hidden temporary file in the same folder, then ``os.replace`` swaps it
  in. A run killed at any moment leaves the old file or the new one, never a partial one.
- Existing content is re-read just before writing, so the policy sees the file as it is now.
- Changing a non-empty caption file first keeps a copy ``<name>.bak`` (``.bak1``, ``.bak2``... when
  older backups exist) unless backups are turned off.
- A temporary file left by a killed run is removed by the next run (it is hidden and named so that
  no training tool reads it as a caption meanwhile).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from captioners.batch.job import ExistingPolicy
from captioners.batch.shaping import merge_texts

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".captioners-tmp"
STALE_AFTER_S = 3600  # where a writer's liveness cannot be asked (Windows), older temp files are stale


@dataclass
class Decision:
    action: str              # create | overwrite | append | prepend | unchanged | skip
    text: str                # the caption file's content afterwards
    old: str | None = None   # its content before (None: no file)


# Planning resolved the caption files that are links within the dataset; a link found at read time
# appeared since, and is refused rather than followed.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_bytes_no_follow(path: Path) -> bytes:
    """The file's bytes; an OSError (ELOOP) instead of following a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link, which is never followed", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def read_existing(path: Path) -> tuple[bytes | None, str | None]:
    """The caption file's bytes and text (None, None when it does not exist).

    Raises UnicodeDecodeError for a file that is not UTF-8, so it is never rewritten blindly.
    """
    try:
        data = read_bytes_no_follow(path)
    except FileNotFoundError:
        return None, None
    return data, data.decode("utf-8-sig")


def has_caption(path: Path) -> bool:
    """A non-empty caption file exists (an empty one counts as not captioned yet)."""
    try:
        return bool(read_bytes_no_follow(path).strip())
    except OSError:
        return False


def decide(old: str | None, new: str, policy: ExistingPolicy, separator: str, dedupe_tags: bool) -> Decision:
    if old is None or not old.strip():
        return Decision("create", new, old)
    if policy == ExistingPolicy.SKIP:
        return Decision("skip", old, old)
    if policy == ExistingPolicy.OVERWRITE:
        text = new
    else:
        text = merge_texts(old, new, separator, dedupe_tags, new_first=policy == ExistingPolicy.PREPEND)
    return Decision(policy.value if text != old else "unchanged", text, old)


def write_caption(target: Path, text: str, old_bytes: bytes | None, backup: bool) -> Path | None:
    """Write ``text`` (UTF-8) to ``target`` atomically; returns the backup file made, if any."""
    return replace_file(target, text.encode("utf-8"), old_bytes, backup)


def replace_file(target: Path, data: bytes, old_bytes: bytes | None, backup: bool) -> Path | None:
    """Write ``data`` to ``target`` atomically, first keeping ``old_bytes`` (its content now, when not
    empty) in a numbered backup unless ``backup`` is off; returns the backup file made, if any."""
    target.parent.mkdir(parents=True, exist_ok=True)
    backup_file = None
    replacing = old_bytes is not None and bool(old_bytes.strip())
    if replacing and backup:
        backup_file = free_backup_path(target)
        atomic_write(backup_file, old_bytes, durable=True)
    # fsync only when replacing content: a new file lost to a power cut is just written again.
    atomic_write(target, data, durable=replacing)
    return backup_file


def free_backup_path(target: Path) -> Path:
    candidate = target.with_name(target.name + ".bak")
    number = 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}.bak{number}")
        number += 1
    return candidate


def atomic_write(target: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``target`` with ``data`` in one step; on any failure (or Ctrl-C) nothing is left behind."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        with contextlib.suppress(OSError):  # keep the permissions of the file being replaced
            os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files of earlier runs that died before renaming them; others' live ones are kept."""
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    except OSError:
        return removed
    for path in candidates:
        if _writer_may_be_alive(path):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
            log.info("Removed %s, left by an interrupted run", path)
    return removed


def _writer_may_be_alive(path: Path) -> bool:
    parts = path.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    try:
        pid = int(parts[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime < STALE_AFTER_S
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
