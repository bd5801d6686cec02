"""File names as people and files can take them.

On POSIX a file name is bytes: it may hold a newline (which would split a ``path<TAB>caption`` or a
summary line) or bytes that are not UTF-8 (Python keeps them as lone surrogates, which UTF-8 output
refuses). Two ways out, one for each kind of reader:

- :func:`display_path`: one line for terminals, summaries, CSV and HTML; control characters and
  undecodable bytes become visible escapes (``\\n``, ``\\x07``, ``\\xff``).
- :func:`json_bytes`: JSON that keeps such names exactly: a lone surrogate is written as the JSON
  escape ``\\udcff``, which ``json.loads`` reads back to the same string (and ``os.fsencode`` to the
  original bytes).
"""

from __future__ import annotations

import json
import os
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_path(path: str | os.PathLike) -> str:
    """``path`` as one printable line (lossy only for names no one types: control chars, bad bytes)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in _NAMED:
            out.append(_NAMED[char])
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def json_bytes(data: Any, indent: int | None = None) -> bytes:
    """UTF-8 JSON in which undecodable file-name bytes survive as ``\\udcXX`` escapes."""
    return json.dumps(data, ensure_ascii=False, indent=indent).encode("utf-8", "backslashreplace")
