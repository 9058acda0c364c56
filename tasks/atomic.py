"""Files that appear whole or not at all: the Parquet parts, the plan, the manifest.

Readers (DuckDB, Polars, Spark, a run planning from the history) list the output while a run
writes it; a file they can see must be complete, on a local disk as on an object store, and
after a crash of the machine as after one of the process.
"""
from __future__ import annotations

import logging
import os
import posixpath
import secrets

import fsspec

from .storage import is_local

logger = logging.getLogger(__name__)


class AtomicWriter:
    """A file handle whose content appears at ``path`` only when closed successfully.

    Local files are written under a temporary name of their own (two processes
    finishing one commit both write its manifest), flushed to the disk, and
    renamed, the folder then flushed too: after a crash of the machine the name
    holds the old content or the whole new one, never an empty file. Object
    stores need nothing extra, as an object becomes visible only when its upload
    completes. ``abort()`` leaves nothing behind on either.
    """

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.tmp = f"{path}.{secrets.token_hex(4)}.inprogress" if is_local(fs) else path
        self.handle = fs.open(self.tmp, "wb")

    def close(self) -> None:
        if self.tmp == self.path:
            self.handle.close()
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.fs.mv(self.tmp, self.path)
        _fsync_dir(posixpath.dirname(self.fs._strip_protocol(self.path)))

    def abort(self) -> None:
        """Drop what was written; never raises, so the error that caused it stays visible."""
        try:
            if self.tmp == self.path:  # object stores: abandon the upload, nothing appears
                discard = getattr(self.handle, "discard", None)
                if discard is not None:
                    discard()  # s3fs aborts its multipart upload; fsspec's default does nothing
                if isinstance(self.handle, fsspec.spec.AbstractBufferedFile):
                    # never closed: closing, or its finaliser doing so, uploads what was written
                    self.handle.closed = True
            else:
                self.handle.close()
                if self.fs.exists(self.tmp):
                    self.fs.rm_file(self.tmp)
        except Exception:  # noqa: BLE001
            logger.warning("could not clean up %s", self.tmp, exc_info=True)


def _fsync_dir(path: str) -> None:
    """Flush a local folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old content or the new, never part."""
    writer = AtomicWriter(fs, path)
    try:
        writer.handle.write(data)
    except BaseException:
        writer.abort()
        raise
    writer.close()
