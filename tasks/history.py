"""What the dataset already holds: committed runs, scored versions, failures, latest.

Only files listed by committed manifests count, so a crashed or running run
never changes what the next run plans, and :func:`latest` is a reader's
snapshot that never shows a half-committed run.
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from deit_model.decode import CORRUPT, EMPTY, NOT_AN_IMAGE, TOO_LARGE, TOO_MANY_BYTES

from . import storage
from .plan import RunRefused
from .report import RunSummary, list_runs
from .schema import model_slug, table_of

logger = logging.getLogger(__name__)


def committed_runs(output: str, storage_options: dict | None = None, model: str | None = None) -> list[RunSummary]:
    """Committed runs under ``output``, oldest commit first (optionally of one model)."""
    runs = [r for r in list_runs(output, storage_options) if r.status == "committed"]
    runs = [r for r in runs if model is None or r.model == model]
    return sorted(runs, key=lambda r: (r.committed_at, r.run_id))


def committed_files(runs: list[RunSummary], table: str) -> list[str]:
    """The ``table`` files ("predictions" or "errors") of ``runs``."""
    return [f for r in runs for f in r.files if table_of(f) == table]


def read_files(files: list[str], columns: list[str], storage_options: dict | None = None,
               filter=None) -> pa.Table | None:
    """Read ``columns`` of Parquet ``files`` (one filesystem); None when there are none."""
    if not files:
        return None
    fs = storage.filesystem(files[0], storage_options)[0]
    dataset = ds.dataset([fs._strip_protocol(f) for f in files], filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns, filter=filter)


def version_key(table: pa.Table) -> pa.Array:
    """The object version used for change detection: its etag, else size and mtime."""
    size = pc.cast(table["source_size"], pa.string())
    mtime = pc.cast(pc.cast(table["source_mtime"], pa.int64()), pa.string())
    fallback = pc.binary_join_element_wise(pc.fill_null(size, "?"), pc.fill_null(mtime, "?"), "/")
    etag = pc.binary_join_element_wise("etag", table["source_etag"], ":")
    return pc.if_else(pc.is_valid(table["source_etag"]), etag, fallback)


_VERSION_COLUMNS = ["uri", "source_size", "source_etag", "source_mtime"]

# Error types that the same bytes give again (decoding is deterministic; an object's listed size is
# part of its version): an incremental run does not retry them until the object changes;
# --only-failed does. A read error, an object missing when read, a process that died, and
# preprocess_error (which is whatever the checkpoint's preprocessing raised, a MemoryError
# included) may pass, so those are retried.
LASTING_ERRORS = (EMPTY, NOT_AN_IMAGE, CORRUPT, TOO_LARGE, TOO_MANY_BYTES)


def scored_versions(runs: list[RunSummary], revision: str | None, storage_options: dict | None = None) -> pa.Table:
    """(uri, version) of every successful prediction of committed ``runs`` (one model's) at ``revision``."""
    return _versions(runs, revision, "predictions", storage_options)


def failed_versions(runs: list[RunSummary], revision: str | None, storage_options: dict | None = None) -> pa.Table:
    """(uri, version, lasting) of every error row of committed ``runs`` at ``revision``; see LASTING_ERRORS."""
    table = _versions(runs, revision, "errors", storage_options, ["error_type"])
    lasting = pc.is_in(table["error_type"], value_set=pa.array(LASTING_ERRORS))
    return table.drop_columns(["error_type"]).append_column("lasting", lasting)


def _versions(runs: list[RunSummary], revision: str | None, kind: str, storage_options: dict | None,
              extra: list[str] = ()) -> pa.Table:
    """(uri, version, *extra) of the ``kind`` rows of committed ``runs`` (of ``revision``, if given)."""
    files = committed_files(runs, kind)
    table = read_files(files, _VERSION_COLUMNS + list(extra), storage_options,
                       filter=ds.field("model_revision") == revision if revision else None)
    if table is None:
        return pa.table({"uri": pa.array([], pa.string()), "version": pa.array([], pa.string()),
                         **{name: pa.array([], pa.string()) for name in extra}})
    return pa.table({"uri": table["uri"], "version": version_key(table), **{name: table[name] for name in extra}})


def check_embedding_width(runs: list[RunSummary], model: str, revision: str | None, width: int,
                          storage_options: dict | None = None) -> None:
    """Refuse a checkpoint whose embeddings differ in width from those already under its partition.

    Why: ``embedding`` is a fixed-size list, so two widths in one ``model_slug=``
    partition make Polars and pyarrow refuse to read it (found in review: two
    checkpoints in folders named ``final``). One footer is read: the newest file
    of another revision of the same slug. Other revisions of the same width pass.
    """
    slug = model_slug(model)
    others = [r for r in runs if model_slug(r.model) == slug and r.model_revision != revision]
    for uri in reversed(committed_files(others, "predictions")[-3:]):  # newest first; a file may be gone
        fs, path = storage.filesystem(uri, storage_options)
        try:
            with fs.open(path, "rb") as fh:
                field = pq.read_schema(fh).field("embedding")
        except FileNotFoundError:
            continue
        if field.type.list_size != width:
            run = next(r for r in others if uri in r.files)
            raise RunRefused(
                f"model_slug={slug} already holds embeddings of {field.type.list_size} floats from model "
                f"{run.model!r} revision {run.model_revision} (run {run.run_id}); this checkpoint's are {width}, "
                "and readers cannot combine both widths in one partition: give the checkpoint's folder another "
                "name, or write to another --output")
        return


def failed_uris(runs: list[RunSummary], output: str, model: str, which: str,
                storage_options: dict | None = None) -> set[str]:
    """URIs that failed in run ``which``, or (``which == "any"``) whose latest result is an error.

    ``runs`` are the output's committed runs (:func:`committed_runs`, which the planning has read).
    """
    runs = [r for r in runs if r.model == model]
    if which != "any":
        runs = [r for r in runs if r.run_id == which]
        if not runs:
            raise RunRefused(f"no committed run {which!r} of model {model!r} under {output}")
        errors = read_files(committed_files(runs, "errors"), ["uri"], storage_options)
        return set(errors["uri"].to_pylist()) if errors is not None else set()
    newest = _newest(runs, storage_options)
    return set(newest.filter(pc.equal(newest["status"], "failed"))["uri"].to_pylist())


def latest(output: str, storage_options: dict | None = None, model: str | None = None) -> pa.Table:
    """The newest committed result per URI: (uri, status, run_id, at) across both tables.

    "Newest" is by commit order, so reprocessing a URI replaces its row here
    without rewriting the partitions that hold the older one.
    """
    return _newest(committed_runs(output, storage_options, model), storage_options)


def _newest(runs: list[RunSummary], storage_options: dict | None) -> pa.Table:
    """:func:`latest` over committed ``runs``, oldest commit first."""
    order = {r.run_id: i for i, r in enumerate(runs)}
    parts = []
    for table, status, at in (("predictions", "scored", "scored_at"), ("errors", "failed", "failed_at")):
        t = read_files(committed_files(runs, table), ["uri", "run_id", at], storage_options)
        if t is not None:
            parts.append(pa.table({"uri": t["uri"], "status": pa.array([status] * t.num_rows),
                                   "run_id": t["run_id"], "at": t[at]}))
    if not parts:
        return pa.table({"uri": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                         "run_id": pa.array([], pa.string()), "at": pa.array([], pa.timestamp("us", tz="UTC"))})
    both = pa.concat_tables(parts)
    rank = pa.array([order.get(r, -1) for r in both["run_id"].to_pylist()])
    both = both.append_column("commit_order", rank).sort_by([("commit_order", "descending")])
    keep, seen = [], set()
    for i, uri in enumerate(both["uri"].to_pylist()):  # first row per uri is its newest
        if uri not in seen:
            seen.add(uri)
            keep.append(i)
    return both.take(pa.array(keep, pa.int64())).drop_columns(["commit_order"])
