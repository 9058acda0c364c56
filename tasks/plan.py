"""Plan a run: give it an identity, and decide which listed images it scores.

By default a run is incremental: an image already scored successfully by the
same model and revision, in the same version (etag, or size and mtime when the
store has no etag), is skipped; new and changed images are planned. ``force``
plans everything listed; ``only_failed`` plans only images that failed (in one
run, or whose latest result is an error). The plan is written once per run, so
a resumed run scores exactly the set its first attempt planned.
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .enumerate import IMAGE_EXTENSIONS, plan_table, write_plan
from .settings import ScoreSettings

logger = logging.getLogger(__name__)

# parameters that define what a run computes: a resume must not change them
IDENTITY = ("input", "output", "model", "revision", "top_k", "token_features", "embedding_dtype",
            "fast_decode", "device_decode", "force", "only_failed", "include", "exclude", "modified_after",
            "modified_before", "limit", "dtype", "max_pixels", "max_bytes")


@dataclass(frozen=True)
class RunInfo:
    """Identity of one run and where its bookkeeping lives."""

    run_id: str
    run_date: str  # UTC date of the run's start: the run_date partition
    started_at: str  # ISO 8601, UTC
    output: str
    attempt: str = ""  # this attempt's claim on the run (tasks.commit.claim_run); "" before it has one
    earlier: tuple[str, ...] = ()  # the run's files when this attempt claimed it: all it counts besides its own

    @property
    def run_dir(self) -> str:
        """``<output>/_runs/<run_id>``: plan and manifest of this run."""
        return storage.join(self.output, "_runs", self.run_id)

    @property
    def plan_uri(self) -> str:
        return storage.join(self.run_dir, "plan.parquet")

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.run_dir, "manifest.json")

    @property
    def claim_uri(self) -> str:
        return storage.join(self.run_dir, "attempt.json")

    @property
    def staging_dir(self) -> str:
        """``<output>/_staging/<run_id>``: where files wait until the run commits."""
        return storage.join(self.output, "_staging", self.run_id)


def new_run(settings: ScoreSettings, now: datetime | None = None) -> RunInfo:
    """A RunInfo for ``settings``; the id is time-based unless the user set one."""
    now = now or datetime.now(timezone.utc)
    run_id = settings.run_id or new_run_id(now)
    return RunInfo(run_id, f"{now:%Y-%m-%d}", now.isoformat(timespec="seconds"), settings.output)


def new_run_id(now: datetime | None = None) -> str:
    """A fresh run id: the UTC start time, and a random suffix so that runs started together differ."""
    return f"{(now or datetime.now(timezone.utc)):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def resumed_run(settings: ScoreSettings, previous) -> RunInfo:
    """The RunInfo of an unfinished run being resumed; its parameters must not differ."""
    changed = [k for k in IDENTITY if _comparable(k, _recorded(previous, k)) != _comparable(k, getattr(settings, k))]
    if changed:
        raise RunRefused(
            f"run {previous.run_id} was started with different {', '.join(changed)}; rerun it with its "
            "original parameters (see its manifest) or start a new run without --run-id")
    return RunInfo(previous.run_id, previous.run_date, previous.started_at, settings.output)


class RunRefused(ValueError):
    """The run cannot go on as asked, and a plain resume would not help: the message says what to do."""


class CheckpointChanged(RunRefused):
    """The model a run was planned with is no longer what its name resolves to."""


def run_checkpoint(settings: ScoreSettings, pinned: str | None = None):
    """The run's checkpoint: as ``settings`` name it, or at ``pinned``, the revision it was planned with.

    One run's rows come from one model. A hub model (or ``timm:``) is fetched at the
    pinned commit, even when its branch has moved since; a checkpoint directory (its
    revision is a content hash) that was replaced since is refused.
    """
    from deit_model import resolve_checkpoint

    hub_commit = pinned and not pinned.startswith("sha256:")
    ref = resolve_checkpoint(settings.model, pinned if hub_commit else settings.revision, settings.storage_options)
    if pinned and ref.revision != pinned:
        raise CheckpointChanged(
            f"model {settings.model} is now revision {ref.revision}, but this run was planned with {pinned}, "
            "and one run's rows come from one model: restore that checkpoint to resume the run, or start a "
            "new run without --run-id")
    if (settings.revision or "").startswith("sha256:") and ref.revision != settings.revision:
        # a directory's content hash given as its revision is a check of its weights
        raise CheckpointChanged(f"model directory {settings.model} is revision {ref.revision}, not the "
                                f"{settings.revision} that the revision option names: its files are other ones")
    return ref


def _comparable(name: str, value) -> str:
    """A parameter as a resume compares it: a local input or output as its absolute path.

    So ``--output scores`` and ``--output /data/scores`` from /data name one dataset. A
    relative path is taken from the current directory, as the run itself takes it.
    """
    if name in ("input", "output") and isinstance(value, str) and "://" not in value:
        return os.path.normpath(os.path.abspath(os.path.expanduser(value)))
    return str(value)


def _recorded(previous, name: str):
    """A run's recorded parameter; one newer than the run's manifest had its default then."""
    return previous.parameters.get(name, ScoreSettings.model_fields[name].get_default(call_default_factory=True))


@dataclass
class PlanCounts:
    """How the listing divided: what is new, changed, already scored or failed for good, and to score."""

    listed: int = 0
    new: int = 0
    changed: int = 0
    skipped: int = 0
    failed_before: int = 0  # failed in this version with a lasting error: not retried (--only-failed is)
    to_score: int = 0


def plan_run(settings: ScoreSettings, run: RunInfo, model: str, revision: str | None,
             width: int | None = None) -> PlanCounts:
    """List the input, choose what to score, and write the run's plan file.

    ``limit`` cuts the plan (after already-scored images are skipped, and with
    retries of earlier failures last), so ``skipped + to_score`` can be less than ``listed``.
    ``width``, the checkpoint's embedding width, is checked against what the output holds.
    """
    from .history import check_embedding_width, committed_runs, failed_uris
    from .inputs import list_inputs

    runs = committed_runs(settings.output, settings.storage_options)  # one read of the manifests
    if width is not None:
        check_embedding_width(runs, model, revision, width, settings.storage_options)
    listing = unique_uris(_listing_table(list_inputs(settings)))
    counts = PlanCounts(listed=listing.num_rows)
    known = None  # URIs with an earlier successful prediction: what "changed" means
    if settings.only_failed:
        wanted = failed_uris(runs, settings.output, model, settings.only_failed, settings.storage_options)
        plan = listing.filter(pc.is_in(listing["uri"], pa.array(sorted(wanted), pa.string())))
    elif settings.force:
        plan = listing
    else:
        plan, known = _incremental(listing, settings, [r for r in runs if r.model == model], revision, counts)
    if known is None:  # --force or --only-failed: what they leave out of the listing
        counts.skipped = counts.listed - plan.num_rows
    if settings.limit and plan.num_rows > settings.limit:
        # the limit bounds the work, after the skip: a limited nightly run still progresses
        plan = plan.slice(0, settings.limit)
    counts.to_score = plan.num_rows
    counts.changed = plan.num_rows if known is None else (pc.sum(pc.is_in(plan["uri"], known)).as_py() or 0)
    counts.new = plan.num_rows - counts.changed
    write_plan(plan, run.plan_uri, settings.storage_options)
    if counts.listed == 0:
        logger.warning("no images found under %s (extensions: %s)", settings.input,
                       ", ".join(sorted(IMAGE_EXTENSIONS)))
    logger.info("plan: %d listed, %d new, %d changed, %d %s, %d failed before (not retried)", counts.listed,
                counts.new, counts.changed, counts.skipped, left_out(settings.only_failed, settings.force),
                counts.failed_before)
    return counts


def left_out(only_failed: str | None, force: bool) -> str:
    """What ``PlanCounts.skipped`` counts, in words: with --only-failed or --force, not "already scored"."""
    if only_failed:
        return "not selected (--only-failed)"
    return "left for a later run (--limit)" if force else "already scored"


def _incremental(listing: pa.Table, settings: ScoreSettings, runs: list, revision: str | None,
                 counts: PlanCounts) -> tuple[pa.Table, pa.Array]:
    """(plan, URIs scored before): the listing less what committed ``runs`` of the model scored,
    or failed for good, in this version.

    Failures that may pass (a read error) are planned again, after everything else when
    a limit cuts the plan, so a few objects that fail every night cannot take all of it.
    """
    from .history import failed_versions, scored_versions, version_key

    scored = scored_versions(runs, revision, settings.storage_options)
    failed = failed_versions(runs, revision, settings.storage_options)
    keyed = listing.append_column("version", version_key(listing))
    plan = keyed.join(scored, keys=["uri", "version"], join_type="left anti")
    counts.skipped = keyed.num_rows - plan.num_rows
    lasting = failed.filter(failed["lasting"]).select(["uri", "version"])
    unscored = plan.num_rows
    plan = plan.join(lasting, keys=["uri", "version"], join_type="left anti")
    counts.failed_before = unscored - plan.num_rows
    if settings.limit and plan.num_rows > settings.limit:
        plan = _retries_last(plan, failed.filter(pc.invert(failed["lasting"])).select(["uri", "version"]))
    return plan.drop_columns(["version"]), scored["uri"]


def _retries_last(plan: pa.Table, retries: pa.Table) -> pa.Table:
    """``plan`` (with its version column) in listing order, the (uri, version) rows of ``retries`` last."""
    rows = plan.append_column("_row", pa.array(range(plan.num_rows), pa.int64()))
    again = rows.join(retries, keys=["uri", "version"], join_type="left semi")["_row"]
    flagged = rows.append_column("_retry", pc.is_in(rows["_row"], value_set=again.combine_chunks()))
    return flagged.sort_by([("_retry", "ascending"), ("_row", "ascending")]).drop_columns(["_row", "_retry"])


def unique_uris(listing: pa.Table) -> pa.Table:
    """``listing`` with one row per URI: the newest listed version (by mtime, then the last listed).

    A manifest can name an image twice (or as a path and as its file:// URI), and an S3
    Inventory report of all versions has a row per version. Scoring each would write one
    URI twice in one run; the output holds each planned URI exactly once.
    """
    if pc.count_distinct(listing["uri"]).as_py() == listing.num_rows:
        return listing  # the usual case: one hash pass, no sort
    mtime = listing["source_mtime"]  # a row without a time counts as the oldest
    rows = listing.append_column("_row", pa.array(range(listing.num_rows), pa.int64())).append_column(
        "_mtime", pc.fill_null(mtime, pa.scalar(datetime.min.replace(tzinfo=timezone.utc), mtime.type)))
    order = rows.sort_by([("uri", "ascending"), ("_mtime", "ascending"), ("_row", "ascending")])
    uris = order["uri"].combine_chunks()
    # each URI's last row in that order: the one whose next row is another URI
    keep = pa.concat_arrays([pc.not_equal(uris[:-1], uris[1:]), pa.array([True])])
    kept = order.filter(keep).sort_by("_row").drop_columns(["_row", "_mtime"])  # back in listing order
    logger.warning("%d listed rows name a URI listed before (a manifest naming an image twice, or a "
                   "report of several versions); each URI is scored once, its newest version",
                   listing.num_rows - kept.num_rows)
    return kept


def _listing_table(objects) -> pa.Table:
    # built in chunks so the Python objects of a huge listing never all exist at once
    chunks = [plan_table(c) for c in iter(lambda: list(itertools.islice(objects, 10_000)), [])]
    return pa.concat_tables(chunks) if chunks else plan_table([])
