"""What a local folder may hold and a bucket never does: names UTF-8 cannot hold, and files that are no files.

- A name that is not valid UTF-8 (a camera card, an old archive): Python keeps its
  undecodable bytes as lone surrogates, which Parquet's UTF-8 strings cannot hold, and one
  such file failed the whole run at planning (found in review). The listing writes those
  bytes as ``\\xNN`` (:func:`storable`), and reading maps the escape back (:func:`on_disk`),
  so the image is scored under the escaped name.
- A FIFO, a device or a socket with an image's name: reading a FIFO blocks for ever and
  ``/dev/zero`` never ends (found in review). Only regular files are read; the rest become
  read errors (:func:`read_regular`).
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any, Callable

_ESCAPED = re.compile(rb"\\x([0-9a-f]{2})")


def storable(path: str) -> str:
    """``path`` as valid UTF-8 text: the bytes of a name that is not UTF-8 written ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def on_disk(path: str) -> str:
    """The local name that :func:`storable` wrote as ``path`` (``path`` itself where that exists)."""
    if "\\x" not in path or os.path.lexists(path):
        return path
    raw = _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), path.encode("utf-8"))
    return raw.decode("utf-8", "surrogateescape")


def read_regular(fs, paths: list[str], cat: Callable[[Any, list[str]], dict[str, Any]]) -> dict[str, Any]:
    """``cat(fs, names)`` for the regular files among local ``paths``; an OSError for each other path.

    One ``stat`` per file: microseconds beside its decode.
    """
    out: dict[str, Any] = {}
    names: dict[str, str] = {}
    for p in paths:
        name = on_disk(p)
        try:
            mode = os.stat(name).st_mode
        except OSError as exc:  # gone (not_found), or a folder that may not be searched (read_error)
            out[p] = exc
            continue
        if stat.S_ISREG(mode):
            names[p] = name
        else:
            out[p] = OSError(f"{p}: not a regular file (a FIFO, a device, a socket or a folder), so not read")
    raw = cat(fs, list(names.values())) if names else {}
    out.update((p, raw.get(name)) for p, name in names.items())
    return out
