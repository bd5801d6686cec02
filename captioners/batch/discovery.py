"""Finding the images of a job and where each one's caption goes.

Inputs are folders (optionally recursive), image files, glob patterns, a file list, and URIs of object
storage (``s3://bucket/prefix/``: see remote.py; their captions need ``output_dir``). Files that are
not images (caption sidecars, notes, hidden files) are ignored, not reported. Each image maps to one
caption file ``<stem><ext>``: beside it, or under ``output_dir`` mirroring its place below the input
folder. Two images that would share a caption file (``a.jpg`` and ``a.png``) are reported instead of
one silently replacing the other's caption.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from captioners.batch.remote import RemoteFile, find_remote, is_uri, listed_remote_files
from captioners.display import display_path
from captioners.errors import CaptionerError
from captioners.images import is_image_path

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Found:
    """An image and the folder its relative (mirrored) path is taken from (a remote file knows its own)."""

    path: Path | RemoteFile
    root: Path


@dataclass
class Planned:
    """An image of the job with its caption file."""

    index: int
    image: Path | RemoteFile
    caption_file: Path
    id: str = ""  # stable across runs: the image's path relative to its input root (see image_id)


@dataclass
class Discovery:
    items: list[Planned]
    failed: list[tuple[str, str]]  # images that cannot be captioned: (path, reason)
    # Real paths (see real_key) of every image and caption file of the job: outputs must not be one.
    image_keys: set[str] = field(default_factory=set)
    caption_owners: dict[str, Path] = field(default_factory=dict)  # caption file key -> its image


def real_key(path: str | os.PathLike) -> str:
    """One spelling per file: ``ds/./a.txt``, ``ds/../ds/a.txt`` and a link to it all compare equal."""
    return os.path.normcase(os.path.realpath(path))


def link_out_of_tree(caption_file: Path, tree: Path) -> str | None:
    """Why a caption file that is a symbolic link leading outside ``tree`` must not be touched, or None.

    Reading, writing or backing it up would follow the link to a file the job never named (a link
    in a downloaded dataset can point anywhere)."""
    if not caption_file.is_symlink():
        return None
    target, root = os.path.realpath(caption_file), os.path.realpath(tree)
    if os.path.commonpath([target, root]) == root:
        return None
    return (f"its caption file {display_path(caption_file)} is a symbolic link to {display_path(target)}, outside "
            f"{display_path(tree)}; it is never followed: replace it with a plain file or remove it")


def find_images(inputs: list[str], recursive: bool = False, file_list: str | None = None,
                unreadable: list[tuple[str, str]] | None = None) -> Iterator[Found]:
    """Images named by the inputs, each input in a stable (sorted) order. Missing inputs raise;
    sub-folders that cannot be listed are added to ``unreadable`` as (folder, reason)."""
    for item in inputs:
        path = Path(item).expanduser()
        if is_uri(item):
            yield from (Found(file, Path()) for file in find_remote(item, recursive))
        elif path.is_dir():
            yield from _walk(path, recursive, unreadable if unreadable is not None else [])
        elif any(c in item for c in GLOB_CHARS) and not path.exists():
            root = _glob_root(item)
            for match in sorted(glob.glob(os.path.expanduser(item), recursive=True)):
                found = Path(match)
                if found.is_file() and is_image_path(found):
                    yield Found(found, root)
        elif path.is_file() or path.is_symlink():
            if is_image_path(path):
                yield Found(path, path.parent)
        else:
            raise CaptionerError(f"Input {item} does not exist: give existing folders, image files or glob patterns.")
    if file_list:
        yield from _read_file_list(Path(file_list).expanduser())


def _walk(folder: Path, recursive: bool, unreadable: list[tuple[str, str]]) -> Iterator[Found]:
    """Images in ``folder``; hidden files and hidden sub-folders (.git, .cache ...) are left out."""
    if not recursive:
        try:
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if _is_file(e))
        except OSError as exc:
            raise CaptionerError(f"Cannot list the folder {folder}: {exc.strerror or exc}") from exc
        for name in names:
            if is_image_path(folder / name):
                yield Found(folder / name, folder)
        return

    def report(exc: OSError) -> None:
        unreadable.append((str(exc.filename or folder), f"folder not readable: {exc.strerror or exc}"))

    for current, dirs, files in os.walk(folder, onerror=report):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(current)
        for name in sorted(files):
            if is_image_path(base / name):
                yield Found(base / name, folder)


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _glob_root(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard: mirrored paths start there."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _read_file_list(path: Path) -> Iterator[Found]:
    """One image per line, in the list's order: a path (relative ones are relative to the list's
    folder) or an object's URI (``s3://bucket/set/a.jpg``, whose caption needs ``output_dir``); '#'
    starts a comment."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"Cannot read the file list {path}: {exc}") from exc
    named: list[Path | str] = []  # local images as paths, objects as URIs; a missing one fails when opened
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        image = PurePosixPath(line.partition("?")[0]) if is_uri(line) else Path(line).expanduser()
        if is_image_path(image):
            named.append(line if is_uri(line) else image if image.is_absolute() else path.parent / image)
    objects = listed_remote_files(item for item in named if isinstance(item, str))
    for item in named:
        yield Found(next(objects), Path()) if isinstance(item, str) else Found(item, item.parent)


def caption_path(found: Found, extension: str, output_dir: Path | None) -> Path:
    """``<stem><ext>`` beside the image, or at the image's relative place under ``output_dir``."""
    name = found.path.stem + extension
    if isinstance(found.path, RemoteFile):  # plan_images refuses remote inputs without output_dir
        return (output_dir or Path()) / PurePosixPath(found.path.relative).parent / name
    if output_dir is None:
        return found.path.with_name(name)
    try:
        relative = found.path.parent.relative_to(found.root)
    except ValueError:  # e.g. '..' in a glob: fall back to the flat name
        relative = Path()
    return output_dir / relative / name


def plan_images(inputs: list[str], recursive: bool, file_list: str | None, extension: str,
                output_dir: str | None) -> Discovery:
    """Every image once (by real path) with its caption file; caption-file clashes are failures."""
    remote = next((item for item in inputs if is_uri(item)), None)
    if remote and not output_dir:  # before listing it
        raise _needs_output_dir(f"Input {remote}")
    out_dir = Path(output_dir).expanduser() if output_dir else None
    items: list[Planned] = []
    failed: list[tuple[str, str]] = []
    seen_images: set[str] = set()
    owners: dict[str, Path] = {}
    ids: set[str] = set()
    for found in find_images(inputs, recursive, file_list, failed):
        if isinstance(found.path, RemoteFile) and out_dir is None:  # named by the file list
            raise _needs_output_dir(f"{found.path.uri} (in the file list)")
        key = found.path.uri if isinstance(found.path, RemoteFile) else real_key(found.path)
        if key in seen_images:
            continue
        seen_images.add(key)
        target = caption_path(found, extension, out_dir)
        refused = link_out_of_tree(target, out_dir or found.root)
        if refused:
            failed.append((str(found.path), refused))
            continue
        if target.is_symlink():  # a link within the tree: the file it names is the caption file
            target = Path(os.path.realpath(target))
        target_key = real_key(target)
        if target_key in owners:
            failed.append((str(found.path), f"its caption file {display_path(target)} is also the caption file "
                                            f"of {display_path(owners[target_key])}; rename one of the two images"))
            continue
        owners[target_key] = found.path
        items.append(Planned(len(items), found.path, target, image_id(found, ids)))
    return Discovery(items, failed, seen_images, owners)


def _needs_output_dir(what: str) -> CaptionerError:
    return CaptionerError(f"{what} is a URI: no caption file can be written beside images in object storage; give "
                          "a local folder for them (--output-dir, or output_dir of the job).")


def image_id(found: Found, taken: set[str]) -> str:
    """The image's path relative to its input root ('holiday/cat.jpg'), the same in every run of the
    same inputs; when two inputs hold the same relative path, the later image's real path (or URI) instead."""
    if isinstance(found.path, RemoteFile):
        candidate, unique = found.path.relative, found.path.uri
    else:
        unique = real_key(found.path)
        try:
            candidate = found.path.relative_to(found.root).as_posix()
        except ValueError:
            candidate = unique
    if candidate in taken:
        candidate = unique
    taken.add(candidate)
    return candidate
