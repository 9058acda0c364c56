"""Commit a run into the dataset, exactly once, and resume one that did not finish.

A run stages its files under ``_staging/<run_id>/``, where no reader looks.
Committing is write-ahead:

1. the manifest is written with ``status: committing`` and the final file list;
2. the staged files are moved into their partitions (a rename on local disks,
   copy+delete on object stores);
3. the manifest is rewritten with ``status: committed`` — the commit point.

A crash during 2 is rolled forward by the next run of the same output
(:func:`roll_forward`), so a run is either absent from the dataset or wholly
in it. A rerun of an unfinished run finds the files it already wrote (staged,
or moved by an interrupted commit) and scores only the rest, so every planned
URI ends up exactly once in predictions or errors.

Each attempt claims the run (:func:`claim_run`) and commits only the files it
counted: those there when it started, and its own. An earlier attempt still
running when a later one claimed the run stops before its commit.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
from dataclasses import replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .atomic import write_atomic
from .plan import RunInfo, RunRefused
from .report import RunSummary, list_runs, read_manifest, write_manifest
from .schema import table_of

logger = logging.getLogger(__name__)

TABLES = ("predictions", "errors")


class IncompleteRunError(RuntimeError):
    """Planned images, or files the run counted, are missing: the run must not be committed."""


class RunTakenOver(RunRefused):
    """Another attempt of this run started after this one: that one goes on, this one stops."""


def check_complete(plan: pa.Table, done: pa.Table, run: RunInfo) -> None:
    """Raise IncompleteRunError unless every planned URI has a row in the run's files (``done``).

    The last check before a commit, whose clean-up deletes the staging area: whatever made a
    row go missing (files the listing did not find, a batch lost on the way), the run fails
    instead, its staged files kept, and a rerun of its id scores what is missing.
    """
    lacking = plan.filter(pc.invert(pc.is_in(plan["uri"], value_set=done["uri"])))
    missing = lacking.num_rows
    if missing:
        example = lacking["uri"][0].as_py()
        raise IncompleteRunError(
            f"{missing} of the {plan.num_rows} planned images have no row in run {run.run_id}'s files "
            f"(one: {example}); nothing was committed or deleted. Rerun with --run-id {run.run_id} "
            "to score what is missing")


def claim_run(run: RunInfo, storage_options: dict | None = None) -> RunInfo:
    """``run`` with an attempt of its own, recorded as the run's latest (``_runs/<id>/attempt.json``).

    Nothing locks a run: a user may resume one whose process is still alive (Prefect called it
    crashed, say). Both would then score the same images. The later attempt wins: it counts only
    the files that existed when it started and its own, and the earlier one, finding another
    attempt recorded, stops before its commit (:func:`check_claim`).
    """
    token = secrets.token_hex(4)
    record = {"attempt": token, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "pid": os.getpid()}
    fs, path = storage.filesystem(run.claim_uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomic(fs, path, json.dumps(record).encode())
    # listed once: a retried score step listing again would count what another attempt wrote since
    return replace(run, attempt=token, earlier=tuple(run_files(run, storage_options)))


def check_claim(run: RunInfo, storage_options: dict | None = None) -> None:
    """Raise RunTakenOver if an attempt other than ``run``'s was recorded since it claimed the run."""
    if not run.attempt:
        return  # a caller that never claimed (a test, a tool): nothing to compare
    fs, path = storage.filesystem(run.claim_uri, storage_options)
    with fs.open(path, "r") as fh:
        record = json.load(fh)
    if record.get("attempt") != run.attempt:
        raise RunTakenOver(
            f"run {run.run_id} was resumed by another attempt (started {record.get('started_at')} on "
            f"{record.get('host')}, pid {record.get('pid')}) while this one ran; that attempt commits it, "
            "and this one stopped without committing")
_DONE_SCHEMA = pa.schema([("uri", pa.string()), ("error_type", pa.string())])


def staged_files(run: RunInfo, storage_options: dict | None = None) -> list[str]:
    """Complete staged Parquet files of ``run`` (in-progress ones end in .inprogress)."""
    fs, root = storage.filesystem(run.staging_dir, storage_options)
    return sorted(storage.to_uri(fs, p) for p in fs.glob(f"{root}/*/*/*/*.parquet"))


def moved_files(run: RunInfo, storage_options: dict | None = None) -> list[str]:
    """Files of ``run`` already in the dataset (moved by an interrupted commit)."""
    fs, root = storage.filesystem(run.output, storage_options)
    # exact: run "nightly" must not claim the files of run "nightly-2"
    name = re.compile(rf"part-{re.escape(run.run_id)}-[0-9a-f]{{6}}-\d{{5,}}\.parquet")
    found = []
    for table in TABLES:
        pattern = f"{root}/{table}/model_slug=*/run_date={run.run_date}/part-{run.run_id}-*.parquet"
        found += [storage.to_uri(fs, p) for p in fs.glob(pattern) if name.fullmatch(p.rsplit("/", 1)[-1])]
    return sorted(found)


def final_uri(run: RunInfo, staged: str, storage_options: dict | None = None) -> str:
    """Where a staged file lives once committed: the same path under the output root."""
    fs, staging = storage.filesystem(run.staging_dir, storage_options)
    root = storage.filesystem(run.output, storage_options)[1]
    rel = fs._strip_protocol(staged)[len(staging.rstrip("/")):].lstrip("/")
    return storage.to_uri(fs, f"{root.rstrip('/')}/{rel}")


def run_files(run: RunInfo, storage_options: dict | None = None) -> list[str]:
    """The run's complete files: staged, or moved by an interrupted commit."""
    return staged_files(run, storage_options) + moved_files(run, storage_options)


def done_rows(run: RunInfo, storage_options: dict | None = None, files: list[str] | None = None) -> pa.Table:
    """URIs the run already wrote (uri, error_type; error_type null for predictions), in ``files``
    where given, else in all of :func:`run_files`."""
    files = run_files(run, storage_options) if files is None else files
    parts = [_DONE_SCHEMA.empty_table()]
    fs = storage.filesystem(run.output, storage_options)[0]
    for uri in files:
        is_error = table_of(uri) == "errors"
        with fs.open(fs._strip_protocol(uri), "rb") as fh:
            t = pq.read_table(fh, columns=["uri", "error_type"] if is_error else ["uri"])
        if not is_error:
            t = t.append_column("error_type", pa.nulls(t.num_rows, pa.string()))
        parts.append(t.cast(_DONE_SCHEMA))
    return pa.concat_tables(parts)


def count_done(done: pa.Table) -> tuple[int, int, dict[str, int]]:
    """(scored, failed, errors_by_type) of a run's written rows."""
    failed = done.filter(pc.is_valid(done["error_type"]))
    by_type = {r["values"]: r["counts"] for r in pc.value_counts(failed["error_type"]).to_pylist()}
    return done.num_rows - failed.num_rows, failed.num_rows, by_type


def commit(summary: RunSummary, run: RunInfo, storage_options: dict | None = None) -> RunSummary:
    """Move the run's staged files into the dataset and mark it committed.

    A run committed already (a retry of this step after its commit point) is left as it is:
    writing it again would give it a later ``committed_at``, and move it past runs committed since.
    """
    current = read_manifest(run.output, run.run_id, storage_options)
    if current is not None and current.status == "committed":
        logger.info("run %s is committed already", run.run_id)
        return current
    check_claim(run, storage_options)
    staged, finals = _counted(run, summary.files, storage_options)
    # a set: on an object store a move is a copy then a delete, so a commit that died between the
    # two finds the file both moved and still staged. A copy: the caller's summary says what the
    # disk says only once the write succeeded (a failed write left "committing" in memory only)
    summary = replace(summary, status="committing", files=sorted(finals))
    write_manifest(summary, run, storage_options)  # the intent, with the full file list
    return _finish(summary, run, staged, storage_options)


def _is_staged(run: RunInfo, uri: str, storage_options: dict | None) -> bool:
    fs, staging = storage.filesystem(run.staging_dir, storage_options)
    return fs._strip_protocol(uri).startswith(staging.rstrip("/") + "/")


def _counted(run: RunInfo, files: list[str], storage_options: dict | None) -> tuple[list[str], set[str]]:
    """(the staged files among ``files``, the final URIs of all of them): what the attempt counted.

    Only these are committed: a staged file the attempt did not count (an earlier attempt's,
    still running when this one started) would put its images in the dataset twice.
    IncompleteRunError if any of them is neither staged nor moved.
    """
    wanted = {final_uri(run, f, storage_options) if _is_staged(run, f, storage_options) else f for f in files}
    staged = _staged_for(run, wanted, storage_options)
    found = {*staged.values(), *(set(moved_files(run, storage_options)) & wanted)}
    if found != wanted:
        lost = sorted(wanted - found)
        raise IncompleteRunError(f"{len(lost)} of the files run {run.run_id} counted are neither staged nor in the "
                                 f"dataset (one: {lost[0]}); nothing was committed")
    return list(staged), wanted


def _staged_for(run: RunInfo, finals: set[str], storage_options: dict | None) -> dict[str, str]:
    """The run's staged files whose final URI is one of ``finals``, each with that URI."""
    staged = {s: final_uri(run, s, storage_options) for s in staged_files(run, storage_options)}
    return {s: final for s, final in staged.items() if final in finals}


def _finish(summary: RunSummary, run: RunInfo, staged: list[str], storage_options: dict | None) -> RunSummary:
    """Steps 2 and 3: move ``staged``, then write the commit point, unless it is written already.

    Two processes may finish one commit at once (a run starting on this output rolls
    forward a commit that its own process is still making), so a file already moved
    by the other is not an error, and neither rewrites a committed manifest.
    """
    _move(run, staged, storage_options)
    current = read_manifest(run.output, run.run_id, storage_options)
    if current is not None and current.status == "committed":
        logger.info("run %s was committed meanwhile, by another process", run.run_id)
        return current
    # a copy: should this write fail, the caller's summary still says committing, as the disk does
    summary = replace(summary, status="committed",
                      committed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_manifest(summary, run, storage_options)  # the commit point
    try:
        discard_staging(run, storage_options)
    except Exception:  # noqa: BLE001 - the run is committed: its leftovers must not fail it
        logger.warning("run %s is committed, but its staging area %s could not be deleted; delete it later",
                       run.run_id, run.staging_dir, exc_info=True)
    logger.info("committed run %s: %d files", run.run_id, len(summary.files))
    return summary


def _move(run: RunInfo, staged: list[str], storage_options: dict | None) -> None:
    fs = storage.filesystem(run.output, storage_options)[0]
    for src in staged:
        dst = fs._strip_protocol(final_uri(run, src, storage_options))
        fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        try:
            fs.mv(fs._strip_protocol(src), dst)
        except FileNotFoundError:
            if not fs.exists(dst):
                raise
            # moved meanwhile by another process finishing this commit


def roll_forward(output: str, storage_options: dict | None = None) -> list[str]:
    """Finish commits that a crash interrupted; returns the run ids completed.

    The manifest already lists every file (step 1), so only the move and the
    commit point are left; the manifest is never set back to ``committing``.
    """
    done = []
    for summary in list_runs(output, storage_options):
        if summary.status != "committing":
            continue
        run = RunInfo(summary.run_id, summary.run_date, summary.started_at, output)
        logger.warning("run %s crashed while committing: finishing its commit", run.run_id)
        # only the files the manifest lists: the staged files of an attempt taken over are not
        _finish(summary, run, list(_staged_for(run, set(summary.files), storage_options)), storage_options)
        done.append(run.run_id)
    return done


def discard_staging(run: RunInfo, storage_options: dict | None = None) -> None:
    """Delete the run's staging area (after a commit, or to restart it from nothing)."""
    fs, root = storage.filesystem(run.staging_dir, storage_options)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass  # never staged, or deleted meanwhile by another process finishing this commit
