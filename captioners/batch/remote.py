"""Inputs named by a URI (``s3://bucket/prefix/``, ``gs://...``, ``file://...``): object storage.

Every scheme that ``pyarrow.fs.FileSystem.from_uri`` opens works; credentials come the way pyarrow
finds them (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``~/.aws``;
for GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or the machine's default credentials). An input is listed
here, on the driver (images filtered by extension as in local folders); each image's bytes are read
only when it is preprocessed, by whichever worker does that (a Ray CPU task, a local decoding thread).

Captions cannot go beside an object in a bucket, so remote inputs need ``output_dir``: a local folder
where each caption mirrors the image's path below the URI's prefix (that path is also its id).

This is the one place that knows about URIs: discovery asks :func:`is_uri`, :func:`find_remote` and
(for the URIs of a file list) :func:`listed_remote_files`;
the preprocessing step reads a :class:`RemoteFile` with :func:`read_remote`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from captioners.errors import CaptionerError
from captioners.images import is_image_path

# A scheme of two characters or more, so that a Windows path (C:\data, C:/data) is never a URI.
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
CREDENTIALS_HINT = ("check the bucket and prefix, and the credentials pyarrow reads (s3://: AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws; gs://: GOOGLE_APPLICATION_CREDENTIALS)")

# uri -> (pyarrow filesystem, path inside it). Tests (and callers with a filesystem of their own)
# put a resolver for their scheme in SCHEMES; every other scheme goes to pyarrow.
Resolver = Callable[[str], tuple[Any, str]]
SCHEMES: dict[str, Resolver] = {}


@dataclass(frozen=True)
class RemoteFile:
    """One image in object storage. It prints as its URI (summaries, JSONL, reports name it so)."""

    uri: str
    path: str                           # inside ``filesystem``
    relative: str                       # below the input's prefix: 'holiday/cat.jpg' (its id)
    filesystem: Any = field(repr=False, compare=False)  # a pyarrow.fs.FileSystem (picklable)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:  # display_path and os.fspath show the URI; nothing local opens it
        return self.uri


def is_uri(text: str) -> bool:
    return bool(URI.match(text))


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def open_filesystem(uri: str) -> tuple[Any, str]:
    """(filesystem, path inside it) for ``uri``; a CaptionerError saying what to do otherwise."""
    resolver = SCHEMES.get(scheme(uri))
    try:
        if resolver is not None:
            return resolver(uri)
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(uri)
    except ImportError as exc:
        raise CaptionerError(f"Input {uri}: URIs are read through pyarrow, which is not installed: "
                             "pip install 'ray[data]' (it brings pyarrow; or this package's [ray] extra), or copy "
                             "the images to a local folder.") from exc
    except NotImplementedError as exc:  # e.g. "Got S3 URI but Arrow compiled without S3 support"
        raise CaptionerError(f"Input {uri}: this pyarrow cannot open {scheme(uri)}:// URIs ({exception_text(exc)}); "
                             "install a pyarrow built with it (the PyPI wheels have S3 and GCS), or copy the "
                             "images to a local folder.") from exc
    except ValueError as exc:  # pyarrow.ArrowInvalid: a scheme it does not know
        raise CaptionerError(f"Input {uri}: not a URI pyarrow can open ({exception_text(exc)}); give a folder, a glob "
                             "pattern, or an s3://, gs://, hdfs:// or file:// URI.") from exc
    except OSError as exc:  # S3 looks up the bucket's region when it opens
        raise CaptionerError(f"Cannot open input {uri}: {exception_text(exc)}; {CREDENTIALS_HINT}.") from exc


def find_remote(uri: str, recursive: bool) -> Iterator[RemoteFile]:
    """The images below ``uri`` (or the one image it names), sorted; hidden files and folders left out."""
    filesystem, base = open_filesystem(uri)  # first: it says what to do when pyarrow is missing
    import pyarrow.fs

    entries, base, prefix = _list(filesystem, base.rstrip("/"), uri, recursive)
    files = []
    for entry in entries:
        relative = entry.path[len(base):].lstrip("/") if entry.path.startswith(base) else entry.base_name
        hidden = any(part.startswith(".") for part in PurePosixPath(relative).parts)
        if entry.type == pyarrow.fs.FileType.File and not hidden and is_image_path(PurePosixPath(relative)):
            files.append(RemoteFile(f"{prefix}/{relative}", entry.path, relative, filesystem))
    yield from sorted(files, key=_walk_order)


def listed_remote_files(uris: Iterable[str]) -> Iterator[RemoteFile]:
    """The objects a file list names, one per URI, in its order. They are not listed or checked here
    (a missing object fails when it is read, as a missing local file does): a list of a million
    objects costs no million requests. Each bucket's filesystem (``scheme://bucket``) is opened once."""
    opened: dict[str, tuple[Any, int]] = {}
    for uri in uris:
        bare, _, query = uri.partition("?")
        rest = bare.split("://", 1)[1]
        bucket = f"{scheme(uri)}://{rest.split('/', 1)[0]}?{query}"
        if bucket not in opened:
            filesystem, path = open_filesystem(uri)
            # Where the path inside the filesystem starts in the URI (s3://b/k: 'b/k'; file:///p: '/p').
            opened[bucket] = (filesystem, len(rest) - len(path) if rest.endswith(path) else -1)
        filesystem, start = opened[bucket]
        path = rest[start:] if start >= 0 else open_filesystem(uri)[1]
        yield RemoteFile(bare, path, PurePosixPath(path).name, filesystem)


def _list(filesystem: Any, base: str, uri: str, recursive: bool) -> tuple[list[Any], str, str]:
    """(the FileInfos to look at, the path they are relative to, the URI that path has)."""
    import pyarrow.fs

    prefix = uri.split("?", 1)[0].rstrip("/")  # s3://bucket/set?region=...: the files are s3://bucket/set/...
    try:
        info = filesystem.get_file_info(base)
        if info.type == pyarrow.fs.FileType.File:  # one image: relative to its folder
            return [info], str(PurePosixPath(base).parent), prefix.rsplit("/", 1)[0]
        if info.type == pyarrow.fs.FileType.Directory:
            return filesystem.get_file_info(pyarrow.fs.FileSelector(base, recursive=recursive)), base, prefix
    except OSError as exc:  # no credentials, no such bucket, access denied
        raise CaptionerError(f"Cannot list input {uri}: {exception_text(exc)}; {CREDENTIALS_HINT}.") from exc
    raise CaptionerError(f"Input {uri} does not exist: {CREDENTIALS_HINT}.")


def _walk_order(file: RemoteFile) -> tuple[tuple[str, ...], str]:
    """The order a local folder walk gives: a folder's files first, then its sub-folders, by name."""
    parts = PurePosixPath(file.relative).parts
    return parts[:-1], parts[-1]


def read_remote(file: RemoteFile) -> bytes:
    """The object's bytes (an OSError when it cannot be read: the image fails, the run goes on)."""
    with file.filesystem.open_input_stream(file.path) as stream:
        return stream.read()


def exception_text(exc: BaseException) -> str:
    """An exception as one line (pyarrow's messages span several), or its type when it says nothing."""
    return " ".join(str(exc).split()) or type(exc).__name__
