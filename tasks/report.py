"""The run's record: a JSON manifest next to the data, and a summary for people.

A manifest's ``status`` moves running -> committing -> committed, or to failed.
Only committed runs are part of the dataset (see :mod:`tasks.commit`).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from . import storage
from .atomic import write_atomic
from .plan import RunInfo, left_out
from .schema import table_of
from .settings import ScoreSettings

logger = logging.getLogger(__name__)

# storage_options may carry credentials; never write them out.
_SECRET_SETTINGS = {"storage_options"}


@dataclass
class RunSummary:
    """Counts, timings and outcome of one run (small: safe to pass through Prefect)."""

    run_id: str
    status: str  # running | committing | committed | failed
    model: str
    input: str
    output: str
    model_revision: str | None = None  # hub commit, or sha256 content hash of a checkpoint dir
    preprocessing: dict = field(default_factory=dict)  # the image processor's config
    run_date: str = ""
    listed: int = 0  # objects the input held after include/exclude/time/limit
    new: int = 0  # no successful prediction by this model and revision yet (retried passing failures count as new)
    changed: int = 0  # scored before, but the object changed since (etag, or size+mtime)
    skipped: int = 0  # already scored with this version: not scored again
    failed_before: int = 0  # failed in this version with a lasting error (corrupt...): not retried
    to_score: int = 0  # new + changed (or everything, with force; the failed ones, with only_failed)
    scored: int = 0  # over all attempts
    failed: int = 0
    attempt_images: int | None = None  # scored + failed by the last attempt alone: what its rate counts
    errors_by_type: dict[str, int] = field(default_factory=dict)
    top_labels: dict[str, int] = field(default_factory=dict)  # most frequent best labels, most first
    files: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    started_at: str = ""
    committed_at: str = ""
    attempts: int = 0
    message: str = ""
    # fields of a manifest written by a newer version, kept so that rewriting it loses none
    newer_fields: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Images per second over the last attempt's scoring stage (a resume's earlier rows not counted)."""
        images = self.scored + self.failed if self.attempt_images is None else self.attempt_images
        return images / max(self.timings_s.get("score", 0.0), 1e-9)


def public_parameters(settings: ScoreSettings) -> dict:
    """Settings safe to record: everything but storage options."""
    return settings.model_dump(exclude=_SECRET_SETTINGS)


def top_labels(files: list[str], storage_options: dict | None = None, n: int = 10) -> dict[str, int]:
    """The ``n`` most frequent best (top-1) labels in a run's prediction files.

    Reads only the ``labels`` column, file by file and batch by batch, so memory
    stays bounded by the number of distinct labels, not by the number of images.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts: Counter[str] = Counter()
    for uri in files:
        if table_of(uri) != "predictions":
            continue
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["labels"], batch_size=65_536):
                best = pc.list_element(batch.column(0), 0)
                for row in pc.value_counts(best.drop_null()).to_pylist():
                    counts[row["values"]] += row["counts"]
    return dict(counts.most_common(n))


def write_manifest(summary: RunSummary, run: RunInfo, storage_options: dict | None = None) -> str:
    """Write ``_runs/<run_id>/manifest.json`` in one piece and return its URI."""
    fs, path = storage.filesystem(run.manifest_uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomic(fs, path, json.dumps(manifest_record(summary), indent=2, default=str).encode())
    return storage.to_uri(fs, path)


class ManifestError(OSError):
    """A run's manifest cannot be read (cut short by a crash of the machine, edited by hand, foreign)."""


def read_manifest(output: str, run_id: str, storage_options: dict | None = None) -> RunSummary | None:
    """The manifest of ``run_id`` under ``output``, or None if that run never started."""
    fs, path = storage.filesystem(storage.join(output, "_runs", run_id, "manifest.json"), storage_options)
    try:
        return _load(fs, path)
    except FileNotFoundError:
        return None


def _load(fs, path: str) -> RunSummary:
    """The manifest at ``path``; ManifestError, naming it, if it is no manifest.

    Why not skip it: a committed run that planning did not see would be scored again, its rows
    then twice in the dataset. Every run on the output stops instead, saying which file to mend.
    """
    with fs.open(path, "r") as fh:
        text = fh.read()
    try:
        return summary_of(json.loads(text), path)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ManifestError(f"run manifest {storage.to_uri(fs, path)} cannot be read ({type(exc).__name__}: "
                            f"{storage.first_line(exc, 120)}); restore it from a backup, or move its run folder "
                            "out of _runs if that run's files are not in the dataset") from None


def manifest_record(summary: RunSummary) -> dict:
    """What the manifest file holds: the summary's fields, and those of a newer version as they were."""
    record = asdict(summary)
    return {**record.pop("newer_fields"), **record}


def summary_of(record: dict, where: str = "a manifest") -> RunSummary:
    """A manifest's RunSummary; fields this version does not know are kept aside, with a warning.

    Why: a manifest written by a newer version (one more count, say) must not stop an older
    worker, mid-rollout or after a rollback, from listing, planning or committing on that output,
    nor lose those fields when it rewrites the manifest (a roll-forward, a resume).
    """
    known = {f.name for f in fields(RunSummary)} - {"newer_fields"}
    newer = {k: v for k, v in record.items() if k not in known}
    if newer:
        logger.warning("%s has fields this version does not know, kept as they are: %s", where, ", ".join(newer))
    return RunSummary(**{k: v for k, v in record.items() if k in known}, newer_fields=newer)


def list_runs(output: str, storage_options: dict | None = None) -> list[RunSummary]:
    """Every run's manifest under ``output``, oldest first."""
    fs, root = storage.filesystem(storage.join(output, "_runs"), storage_options)
    runs = []
    for path in sorted(fs.glob(f"{root}/*/manifest.json")):
        runs.append(_load(fs, path))
    return sorted(runs, key=lambda r: (r.started_at, r.run_id))


def format_summary(summary: RunSummary) -> str:
    """A few lines for the terminal: outcome, counts, where the data is."""
    skipped = left_out(summary.parameters.get("only_failed"), summary.parameters.get("force", False))
    lines = [
        f"run {summary.run_id}: {summary.status}",
        f"  model:   {summary.model} ({summary.model_revision or 'unknown revision'})",
        f"  plan:    {summary.listed} listed: {summary.new} new, {summary.changed} changed, "
        f"{summary.skipped} {skipped}" + (f", {summary.failed_before} failed before (not retried)"
                                           if summary.failed_before else ""),
        f"  images:  {summary.scored} scored, {summary.failed} failed",
    ]
    if summary.errors_by_type:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(summary.errors_by_type.items()))
        lines.append(f"  errors:  {kinds}")
    if summary.timings_s:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary.timings_s.items())
        lines.append(f"  time:    {stages} ({summary.throughput:.1f} img/s while scoring)")
    root = summary.output.rstrip("/")
    if any(table_of(f) == "predictions" for f in summary.files):
        lines += [
            f"  output:  {root}/predictions (and {root}/errors), {len(summary.files)} files",
            f"  query:   duckdb -c \"select uri, labels[1], scores[1] from read_parquet("
            f"'{root}/predictions/**/*.parquet', hive_partitioning=true) limit 10\"",
        ]
    else:  # the query would fail on a dataset with no predictions yet ("No files found")
        lines.append(f"  output:  {root}, {len(summary.files)} files written by this run")
    if summary.message:
        lines.append(f"  note:    {summary.message}")
    return "\n".join(lines)
