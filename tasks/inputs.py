"""What a run reads: a listing or a manifest, narrowed by patterns and a time window.

A manifest is a file of URIs: ``.txt`` (one per line), ``.csv`` or
``.parquet`` with a ``uri`` column. Version columns, where present, are used
as they are (``size``, ``etag``, ``last_modified``, including the spellings
of S3 Inventory reports); otherwise each object is looked up. Everything is a
stream: manifests are read in record batches, listings a directory at a time;
the plan step then holds the selected entries as one Arrow table (about 100
bytes per object, measured in docs/listing.md).
"""
from __future__ import annotations

import fnmatch
import itertools
import logging
from datetime import datetime
from typing import Any, Iterable, Iterator
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .enumerate import ImageObject, list_images
from .plan import RunRefused
from .settings import ScoreSettings, as_utc

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
_ALIASES = {  # our name -> accepted column names (S3 Inventory and common exports)
    "uri": ("uri", "url", "path"),
    "size": ("size", "source_size", "Size"),
    "etag": ("etag", "source_etag", "ETag", "e_tag"),
    "mtime": ("last_modified", "source_mtime", "mtime", "LastModifiedDate", "last_modified_date"),
}
_BATCH = 10_000


def is_manifest(uri: str, storage_options: dict | None = None) -> bool:
    """True when ``uri`` is a manifest file rather than images to list."""
    if not uri.lower().endswith(MANIFEST_SUFFIXES):
        return False
    fs, path = storage.filesystem(uri, storage_options)
    return fs.isfile(path)


def list_inputs(settings: ScoreSettings) -> Iterator[ImageObject]:
    """The run's candidate images, filtered and limited as the settings say."""
    if is_manifest(settings.input, settings.storage_options):
        objects, root = read_manifest(settings.input, settings.storage_options), ""
    else:
        objects = list_images(settings.input, settings.storage_options)
        fs, path = storage.filesystem(settings.input, settings.storage_options)
        # patterns are relative to the input folder; for a glob, to the part before its first glob
        # character. A path that exists is no glob, whatever it holds (as list_images takes it)
        cut = None if fs.exists(path) else storage.glob_cut(path)
        static = path[:cut] if cut is not None else path.rstrip("/")
        root = storage.to_uri(fs, static) + "/"
    return (o for o in objects if _selected(o, root, settings))


def _selected(obj: ImageObject, root: str, s: ScoreSettings) -> bool:
    rel = obj.uri[len(root):] if root and obj.uri.startswith(root) else obj.uri
    if s.include and not any(fnmatch.fnmatchcase(rel, p) for p in s.include):
        return False
    if any(fnmatch.fnmatchcase(rel, p) for p in s.exclude):
        return False
    if obj.mtime is not None:  # objects without a time cannot be placed in a window: kept
        if s.modified_after and obj.mtime < as_utc(s.modified_after):
            return False
        if s.modified_before and obj.mtime >= as_utc(s.modified_before):
            return False
    return True


def read_manifest(uri: str, storage_options: dict | None = None) -> Iterator[ImageObject]:
    """Stream the entries of a manifest file as ImageObjects.

    A manifest that cannot be parsed refuses the run (RunRefused: a resume would read the
    same bytes), naming it; reading errors (OSError) stay as they are, to be retried.
    """
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as fh:
        try:
            if path.lower().endswith(".txt"):
                batches = _text_batches(fh)
            elif path.lower().endswith(".csv"):
                import pyarrow.csv as pcsv

                batches = pcsv.open_csv(fh, read_options=pcsv.ReadOptions(block_size=1 << 22))
            else:
                import pyarrow.parquet as pq

                batches = pq.ParquetFile(fh).iter_batches(batch_size=_BATCH)
            for batch in batches:
                yield from _objects(pa.Table.from_batches([batch]), uri, storage_options)
        except (UnicodeDecodeError, pa.ArrowInvalid) as exc:  # not UTF-8 text, not CSV, not Parquet
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunRefused(f"manifest {uri} cannot be read ({reason}); a manifest is UTF-8 text (.txt), "
                             "CSV (.csv) or Parquet") from None


def _text_batches(fh) -> Iterator[pa.RecordBatch]:
    lines = (raw.decode("utf-8").strip() for raw in fh)
    entries = (line for line in lines if line and not line.startswith("#"))
    while chunk := list(itertools.islice(entries, _BATCH)):
        yield pa.RecordBatch.from_pydict({"uri": chunk})


def _column(table: pa.Table, ours: str) -> list | None:
    for name in _ALIASES[ours]:
        if name in table.column_names:
            return table[name].to_pylist()
    return None


def _objects(table: pa.Table, manifest: str, storage_options) -> Iterator[ImageObject]:
    table = _current_versions(table, manifest)
    uris = _column(table, "uri")
    named = {name.lower(): name for name in table.column_names}
    if uris is None and {"bucket", "key"} <= set(named):  # S3 Inventory
        keys = table[named["key"]].to_pylist()
        if manifest.lower().endswith(".csv"):  # a CSV inventory's keys are URL-encoded (AWS's docs)
            keys = [unquote_plus(k) for k in keys]
        uris = [f"s3://{b}/{k}" for b, k in zip(table[named["bucket"]].to_pylist(), keys)]
    if uris is None:
        raise RunRefused(f"manifest {manifest!r} has no 'uri' column (columns: {table.column_names})")
    sizes, etags, mtimes = (_column(table, k) for k in ("size", "etag", "mtime"))
    if sizes is None and etags is None and mtimes is None:
        yield from _looked_up(uris, storage_options)
        return
    # one scheme per manifest (a run reads through one filesystem); URIs are made
    # canonical so '/x.jpg' and 'file:///x.jpg' are the same image everywhere
    fs, _ = storage.filesystem(uris[0], storage_options) if uris else (None, None)
    for i, uri in enumerate(uris):
        uri = storage.to_uri(fs, fs._strip_protocol(uri))
        mtime = _blank_none(mtimes[i]) if mtimes else None
        if isinstance(mtime, str):
            mtime = datetime.fromisoformat(mtime.replace("Z", "+00:00"))
        etag = _blank_none(etags[i]) if etags else None
        # quoted as S3 and its exports write it, unquoted as a listing gives it (storage.object_version)
        etag = etag.strip('"') if isinstance(etag, str) else etag
        yield ImageObject(uri, _blank_none(sizes[i]) if sizes else None, etag, as_utc(mtime) if mtime else None)


def _current_versions(table: pa.Table, manifest: str) -> pa.Table:
    """An all-versions S3 Inventory report's current versions, delete markers left out.

    A deleted object's newest row is its delete marker: planned, it became a not_found row every
    night; an older version of it is no current object either.
    """
    # Parquet reports say is_latest, a CSV's fileSchema IsLatest
    named = {name.lower().replace("_", ""): name for name in table.column_names}

    def flags(column: str) -> pa.Array:  # true/false, as Parquet's booleans or a CSV's text
        return pa.array([str(v).lower() == "true" for v in table[named[column]].to_pylist()], pa.bool_())

    keep = flags("islatest") if "islatest" in named else None
    if "isdeletemarker" in named:
        live = pc.invert(flags("isdeletemarker"))
        keep = live if keep is None else pc.and_(keep, live)
    if keep is None:
        return table
    kept = table.filter(keep)
    if kept.num_rows < table.num_rows:
        logger.info("manifest %s: %d rows are older versions or delete markers, not current objects",
                    manifest, table.num_rows - kept.num_rows)
    return kept


def _blank_none(value):
    """A CSV's empty cell (pyarrow reads it as "") is no value: an etag of "" matched every version."""
    return None if isinstance(value, str) and not value.strip() else value


def _looked_up(uris: Iterable[str], storage_options: dict | None) -> Iterator[ImageObject]:
    """Version facts for manifest entries that carry none. A missing object still
    yields an entry: it becomes a not_found error row, never a silent drop."""
    fs = None
    for uri in uris:
        if fs is None:
            fs, _ = storage.filesystem(uri, storage_options)
        path = fs._strip_protocol(uri)
        try:
            info: dict[str, Any] = fs.info(path)
        except Exception:  # noqa: BLE001 - reported when the image is read
            info = {}
        etag, mtime = storage.object_version(info)
        yield ImageObject(storage.to_uri(fs, path), info.get("size"), etag, mtime)
