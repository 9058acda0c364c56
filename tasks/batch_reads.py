"""A batch's bytes: read, or refused unread, with each row's reason where it has none.

Both read paths use it: a decode task's stream of a batch (``storage.ReadStream``, in
:func:`tasks.decode.decode_batch`) and a CPU actor's read ahead (:func:`read_batch`).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from deit_model.decode import NOT_FOUND, READ_ERROR, TOO_MANY_BYTES

from . import storage


class ObjectTooLarge(OSError):
    """An object larger, as listed, than the run's ``max_bytes``: refused before it is read."""


def read_batch(batch: dict[str, np.ndarray], storage_options: dict[str, Any],
               max_bytes: int | None = None) -> list[bytes | OSError]:
    """Each row's bytes, or why it has none, for :func:`decode_batch`'s ``datas``.

    Why none: the error that reading raised, or :class:`ObjectTooLarge` for a row
    whose listed size is over ``max_bytes``, which is not read.
    """
    skip, uris = to_read_in(batch, max_bytes)
    return list(in_order(storage.read_uris(uris, storage_options) if uris else [], skip, len(batch["uri"])))


def to_read_in(batch: dict[str, np.ndarray], max_bytes: int | None) -> tuple[dict[int, ObjectTooLarge], list[str]]:
    """(the rows :func:`refused` with their errors, the URIs of the others: those to read)."""
    skip = refused(batch, max_bytes)
    return skip, [str(u) for i, u in enumerate(batch["uri"]) if i not in skip]


def refused(batch: dict[str, np.ndarray], max_bytes: int | None) -> dict[int, ObjectTooLarge]:
    """The rows whose listed ``source_size`` is over ``max_bytes``, with their errors.

    Why before reading: a multi-GB file with an image's name (a video, a disk image)
    would be read whole into the worker's memory before any image check could refuse it.
    A size the listing did not give (some manifests) is read.
    """
    sizes = batch.get("source_size")
    if max_bytes is None or sizes is None:
        return {}
    over = np.flatnonzero(np.asarray(sizes, dtype=float) > max_bytes)  # a missing size is NaN: read
    return {int(i): ObjectTooLarge(f"{int(sizes[i]):,} bytes as listed, over the limit of {max_bytes:,} "
                                   "(--max-bytes); not read") for i in over}


def in_order(results: Iterable, skip: dict, n: int) -> Iterator:
    """The read results of the ``n`` rows not in ``skip``, with the skipped rows' errors in their places."""
    results = iter(results)
    for i in range(n):
        yield skip[i] if i in skip else next(results)


def read_error_type(exc: OSError) -> str:
    """The error_type of a row that has no bytes."""
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND
    return TOO_MANY_BYTES if isinstance(exc, ObjectTooLarge) else READ_ERROR
