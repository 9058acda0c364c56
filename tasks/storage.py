"""The one boundary between the pipeline and object storage (fsspec).

Every filesystem is made here, and backend-specific failures (botocore client
errors, aiohttp errors, gcsfs/adlfs exceptions) come out as Python's own
``FileNotFoundError``, ``PermissionError`` or ``OSError`` so the rest of the
code handles one family of exceptions, as s3fs does for S3.
"""
from __future__ import annotations

import itertools
import logging
import posixpath
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Iterator

import fsspec

from tasks import local_files, s3_reader

logger = logging.getLogger(__name__)


class InputNotFoundError(FileNotFoundError):
    """The input location does not exist or holds no objects."""


# Object stores whose fsspec drivers cache directory listings inside their
# (themselves cached) filesystem instances. A long-lived worker would then miss
# objects added since its last listing, and even fail to open files written
# after it; every listing here must be fresh, so the cache is off by default.
_LISTING_CACHES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
# s3fs reads a batch's objects at once (fsspec gathers up to 128 requests), but botocore's pool
# holds 10 connections, so a batch of 128 objects took 13 round trips, and requests waiting for
# a connection are signed long before they are sent (clock-skew errors on large batches). 64
# makes a batch of up to 64 one round trip; a user's own config_kwargs win.
S3_POOL_CONNECTIONS = 64


# what fsspec reads as glob characters, wherever it lists, moves or deletes
GLOB_CHARS = frozenset("*?[")


def glob_cut(pattern: str) -> int | None:
    """Index of the '/' before ``pattern``'s first glob character (-1 if none precedes it); None without one."""
    first = next((i for i, c in enumerate(pattern) if c in GLOB_CHARS), None)
    return None if first is None else pattern.rfind("/", 0, first)


class StorageConfigError(OSError):
    """``uri`` cannot be reached as configured: unknown scheme, missing driver, no credentials."""


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """``(fs, path)`` for ``uri``; plain paths are local files.

    An unknown scheme (fsspec's ValueError) or a scheme whose driver is not
    installed (ImportError, e.g. gcsfs for gs://) is a StorageConfigError.
    """
    options, scheme = dict(storage_options or {}), fsspec.core.split_protocol(uri)[0]
    if scheme in _LISTING_CACHES:
        options.setdefault("use_listings_cache", False)
    if scheme in {"s3", "s3a"}:
        options["config_kwargs"] = {"max_pool_connections": S3_POOL_CONNECTIONS, **(options.get("config_kwargs") or {})}
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ValueError, ImportError) as exc:
        raise StorageConfigError(f"{uri}: {first_line(exc)}") from exc


def join(base: str, *parts: str) -> str:
    """Join URI or path segments with '/', keeping the scheme of ``base``."""
    return posixpath.join(base.rstrip("/"), *parts) if parts else base


def to_uri(fs, path: str) -> str:
    """A canonical URI (with scheme) for ``path`` on ``fs``."""
    return fs.unstrip_protocol(path)


# Where a storage driver's own exceptions come from; botocore's NoCredentialsError, say, is no OSError
_BACKENDS = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "aiohttp", "fsspec"}


def is_backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError or was raised by a storage driver (so translate_error applies)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _BACKENDS


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line: some drivers' messages run to dozens (pyarrow's HDFS loader)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def translate_error(exc: BaseException, uri: str) -> OSError:
    """Map a backend exception to FileNotFoundError / PermissionError / OSError."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound"):
        return StorageConfigError(f"{uri}: {exc} (set the store's credentials in the environment, "
                                  "e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    text = f"{type(exc).__name__}: {exc}"
    response = getattr(exc, "response", None)  # botocore ClientError carries the S3 code
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if code in ("NoSuchKey", "404", "NoSuchBucket") or "Not Found" in text:
        return FileNotFoundError(2, f"not found: {text}", uri)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or "Forbidden" in text:
        return PermissionError(13, f"access denied: {text}", uri)
    return OSError(f"{uri}: {text}")


# Failures worth retrying: the store or the network was briefly unavailable.
# Everything else (not found, access denied, bad data) fails the same way on a
# retry and only delays the error, so it is never retried.
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException", "TooManyRequests", "500", "502", "503", "504"}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ClientPayloadError",
                    "ServerTimeoutError", "IncompleteReadError", "ResponseStreamingError"}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a passing storage or network failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err, meta = response.get("Error", {}), response.get("ResponseMetadata", {})
            if str(err.get("Code", "")) in _TRANSIENT_CODES or str(meta.get("HTTPStatusCode", "")) in _TRANSIENT_CODES:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def read_many(fs, paths: list[str]) -> dict[str, bytes | OSError]:
    """Read whole objects concurrently where the backend can (s3fs, gcsfs, ...).

    Returns each path's bytes or the translated exception; never raises for a
    single object so one bad object cannot fail its batch. S3 objects go through
    obstore where it reproduces s3fs's settings (``tasks.s3_reader``); whatever it
    fails on is read again by fs, whose answer is the one returned.
    """
    if not paths:
        return {}
    stripped = {p: fs._strip_protocol(p) for p in paths}
    fast = s3_reader.reader_for(fs)
    first = fast.read({p: s for p, s in stripped.items() if fast.readable(s)}) if fast else {}
    again = [p for p in paths if not isinstance(first.get(p), bytes)]
    raw = (local_files.read_regular(fs, again, _cat) if is_local(fs) else _cat(fs, again)) if again else {}
    values = {p: first.get(p) for p in paths}
    values.update((p, raw.get(p, raw.get(stripped[p]))) for p in again)
    if first:
        _judge(fast, first, values)
    out: dict[str, bytes | OSError] = {}
    for p, value in values.items():
        if value is None:
            value = FileNotFoundError(2, "object disappeared before it could be read", p)
        out[p] = value if isinstance(value, bytes) else translate_error(value, p)
    return out


def _cat(fs, paths: list[str]) -> dict[str, Any]:
    """Each path's whole object, read concurrently where the backend can; one by one if the
    batched request fails as a whole.

    ``cat_ranges``, not ``cat``: fsspec's ``cat`` expands a list's paths as globs, so an image
    under ``shoot [2024]/`` became "not found" and ``a?.jpg`` read ``ab.jpg`` too.
    """
    try:
        whole = [None] * len(paths)
        raw = dict(zip(paths, fs.cat_ranges(paths, whole, whole, on_error="return")))
    except Exception as exc:  # the whole request failed: fall back to one by one
        logger.debug("batched read failed (%s); reading one by one", exc)
        raw = {}
        for p in paths:
            try:
                raw[p] = fs.cat_file(p)
            except Exception as one:  # noqa: BLE001 - translated below
                raw[p] = one
    return raw


def _judge(fast, first: dict[str, Any], values: dict[str, Any]) -> None:
    """Stop the fast reader when s3fs read at least half of the objects it last tried and failed.

    A missing object fails on both; a passing error fails on a few. Half of them failing
    there and reading here is a setting obstore does not follow, and every later batch would
    be read twice. Judged over the reader's last objects (``s3_reader.JUDGED``), not one
    call's: a call may read one object.
    """
    outcome = {p: not isinstance(value, bytes) and isinstance(values[p], bytes) for p, value in first.items()}
    recovered = [p for p, read_by_s3fs in outcome.items() if read_by_s3fs]
    failed, tried, enough = fast.record(list(outcome.values()))
    if recovered and enough:
        fast.disable(f"obstore failed on {failed} of the last {tried} objects that s3fs read, e.g. "
                     f"{recovered[0]}: {type(first[recovered[0]]).__name__}: {first_line(first[recovered[0]])}")


def read_uris(uris: list[str], storage_options: dict[str, Any]) -> list[bytes | OSError]:
    """Each URI's bytes, or the error that reading it raised, in order (see :func:`read_many`)."""
    # All URIs of one run share a scheme, so one filesystem serves the batch.
    fs, _ = filesystem(uris[0], storage_options)
    paths = [fs._strip_protocol(u) for u in uris]
    data = read_many(fs, paths)
    return [data[p] for p in paths]


# A batch read in one piece leaves the core idle until its last object arrives (round trips of
# tens of ms on S3); in chunks, READ_AHEAD of them in flight, the first chunk decodes while the
# next ones are read. 32 objects x 2 chunks fill the S3_POOL_CONNECTIONS.
READ_CHUNK, READ_AHEAD = 32, 2


class ReadStream:
    """A batch's read results in row order, read in chunks, at most READ_AHEAD chunks ahead.

    Iterating waits only for the chunk it is in; leaving the ``with`` block waits for the
    reads still running (a decode that raised must not leave them behind). Each object's
    bytes are handed over, not kept: a batch of 128 phone photos (3 to 6 MB each) would
    otherwise stay whole in memory until its last image is decoded.
    """

    def __init__(self, uris: list[str], storage_options: dict[str, Any]):
        self.spans = [uris[i:i + READ_CHUNK] for i in range(0, len(uris), READ_CHUNK)]
        self.options = storage_options
        self.pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="read-ahead") if len(self.spans) > 1 else None

    def __enter__(self) -> "ReadStream":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[bytes | OSError]:
        if self.pool is None:
            yield from read_uris(self.spans[0], self.options) if self.spans else ()
            return
        spans = iter(self.spans)
        pending = deque(self.pool.submit(read_uris, span, self.options) for span in itertools.islice(spans, READ_AHEAD))
        while pending:
            chunk = pending.popleft().result()
            if (span := next(spans, None)) is not None:  # one more read for each chunk taken
                pending.append(self.pool.submit(read_uris, span, self.options))
            chunk.reverse()
            while chunk:
                yield chunk.pop()


def object_version(info: dict[str, Any]) -> tuple[str | None, datetime | None]:
    """``(etag, mtime)`` from an fsspec ``info`` dict, whichever the backend has."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if isinstance(etag, str):
        etag = etag.strip('"')
    mtime = None
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            mtime = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        elif isinstance(value, (int, float)):
            mtime = datetime.fromtimestamp(float(value), tz=timezone.utc)
        elif isinstance(value, str):
            try:
                mtime = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        break
    return (str(etag) if etag else None), mtime


def is_local(fs) -> bool:
    """True for the local filesystem, where files are visible while being written."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))
