"""Enumerate image objects under an input location, and the run's plan file.

The listing is a generator (``fs.walk`` for prefixes, a directory at a time);
the plan step collects it into one Arrow table and writes it as the run's plan
file, which the scoring step reads, so no list of URIs passes through Prefect.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import local_files, storage
from .atomic import write_atomic
from .schema import PLAN_SCHEMA

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
_PLAN_CHUNK = 10_000


@dataclass(frozen=True)
class ImageObject:
    """One listed object: its URI and the version facts used to detect change."""

    uri: str
    size: int | None
    etag: str | None
    mtime: datetime | None


def is_image_name(path: str) -> bool:
    """True when ``path`` has an image file extension (case-insensitive)."""
    dot = path.rfind(".")
    return dot > path.rfind("/") and path[dot:].lower() in IMAGE_EXTENSIONS


def list_images(input_uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[ImageObject]:
    """Yield the image objects under ``input_uri`` (a file, a prefix or a glob).

    Raises :class:`storage.InputNotFoundError` when the location does not exist.
    """
    fs, path = storage.filesystem(input_uri, storage_options)
    try:
        # what exists is taken as named: a folder called "shoot [2024]" is a folder, not a glob
        named = False  # one file named as the input is taken whatever its extension, as a manifest's entries are
        if fs.isdir(path):
            entries = _walk(fs, path)
        elif fs.exists(path):
            entries, named = [(path, fs.info(path))], True
        elif storage.GLOB_CHARS & set(path) and _glob_root_exists(fs, path):
            entries = fs.glob(path, detail=True).items()
        else:
            raise storage.InputNotFoundError(
                f"input {input_uri!r} does not exist; check the path or prefix "
                "(globs such as 's3://bucket/photos/**/*.jpg' are accepted)"
            )
        for p, info in entries:
            if info.get("type") == "directory" or not (named or is_image_name(p)):
                continue
            etag, mtime = storage.object_version(info)
            yield ImageObject(storage.to_uri(fs, local_files.storable(p)), info.get("size"), etag, mtime)
    except storage.InputNotFoundError:
        raise
    except Exception as exc:  # backend errors while listing
        if isinstance(exc, OSError):  # already Python's own: re-raised as it is, its cause (the
            raise  # store's error code, which is_transient reads) kept; "from exc" replaced it
        raise storage.translate_error(exc, input_uri) from exc


def _glob_root_exists(fs, pattern: str) -> bool:
    """Whether the folder before ``pattern``'s first glob character exists.

    A glob under a folder that is not there (a typo, a renamed prefix) would match nothing,
    and a nightly run would commit no images night after night instead of failing.
    """
    cut = storage.glob_cut(pattern)
    return cut < 0 or fs.exists(pattern[:cut] or "/")


def _walk(fs, root: str) -> Iterator[tuple[str, dict]]:
    """(path, info) of every file under ``root``, one folder listed at a time, in name order.

    One level per ``walk`` call: fsspec passes ``on_error`` to the top level only, and left a
    subfolder it could not list out without a word. One folder at a time, a huge prefix is
    never held whole; sorted, a listing is repeatable.
    """
    pending = [root]
    while pending:
        for dirpath, dirs, files in fs.walk(pending.pop(), maxdepth=1, detail=True, on_error=_unlisted):
            base = dirpath.rstrip("/")
            for name in sorted(files):
                if name:
                    yield f"{base}/{name}", files[name]
                    continue
                # keys with an empty segment ("a//b.jpg"): walk shows the "a//" prefix as a nameless
                # folder that it never enters, and they were skipped; the store lists them flat
                found = fs.find(base, detail=True)
                yield from ((p, found[p]) for p in sorted(found) if p.startswith(base + "//"))
            pending.extend(dirs[d]["name"].rstrip("/") for d in sorted(dirs, reverse=True))


def _unlisted(exc: OSError) -> None:
    """A folder under the input that cannot be listed fails the listing, naming it.

    fsspec's default left such a folder out without a word, and with it every image in it
    (found in review: a folder without read permission). One removed while it was listed
    holds nothing to lose.
    """
    if isinstance(exc, FileNotFoundError):
        return
    message = (f"cannot list folder {exc.filename or '?'} under the input ({exc.strerror or exc}); its images "
               "would be left out: fix its permissions, or narrow --input")
    kind = type(exc) if type(exc).__module__ == "builtins" else OSError  # a driver's own class may take other arguments
    raise (kind(exc.errno, message) if exc.errno is not None else kind(message)) from exc


def write_plan(plan: pa.Table, plan_uri: str, storage_options: dict | None = None) -> int:
    """Write the run's plan (PLAN_SCHEMA rows) in one piece; return its row count."""
    import io

    fs, path = storage.filesystem(plan_uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(plan.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA), buf, compression="zstd",
                   row_group_size=_PLAN_CHUNK)
    write_atomic(fs, path, buf.getvalue())
    logger.info("planned %d images into %s", plan.num_rows, plan_uri)
    return plan.num_rows


def plan_table(chunk: list[ImageObject]) -> pa.Table:
    """ImageObjects as a PLAN_SCHEMA table."""
    return pa.Table.from_pydict(
        {
            "uri": [o.uri for o in chunk],
            "source_size": [o.size for o in chunk],
            "source_etag": [o.etag for o in chunk],
            "source_mtime": [o.mtime for o in chunk],
        },
        schema=PLAN_SCHEMA,
    )


def read_plan(plan_uri: str, storage_options: dict | None = None) -> pa.Table:
    """Read a plan file written by :func:`write_plan`."""
    fs, path = storage.filesystem(plan_uri, storage_options)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, schema=PLAN_SCHEMA)
