"""The Ray pipeline: plan -> read+decode (CPU tasks or the actors) -> score (actors) -> Parquet.

With decode tasks, CPU work overlaps model work; on CPU-only machines the
actors decode their own rows. The driver only streams finished batches into
the writer, keeping no per-image state (tasks/actor_pool.py).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from deit_model import CheckpointRef, embedding_dim, load_preprocessor

from .actor_pool import ScorerPool, plan_batches, pool_spec, window_for
from .early_pool import start_early, take_pool, warm_decode_workers
from .placement import Placement, ResourceError, await_placement, plan_placement, release_resources
from .ray_cluster import cluster_resources
from .schema import OutputSpec
from .score import BatchContext
from .settings import ScoreSettings
from .write import DatasetWriter, WriteResult

logger = logging.getLogger(__name__)


def start_actors_early(settings: ScoreSettings, ref: CheckpointRef) -> None:
    """Start the run's scoring actors now if the cluster holds them (the CLI calls it once Ray is up).

    :func:`run_pipeline` takes them over when the run gets there with the
    same model and placement. A cluster that must first scale up is left to
    :func:`await_placement`. Blocks until the first actor is up (CPU actors
    start one after another), so call it on a thread.
    """
    try:
        placement = plan_placement(settings, *cluster_resources())
    except ResourceError:
        return
    spec = pool_spec(settings, ref.source, ref.revision, placement)
    # CPU actors share their cores with the command and Prefect while they start: one first
    start_early(spec, stagger=placement.device == "cpu")
    warm_decode_workers(spec, placement.decode_cpus, placement.spare_cpus)


def run_pipeline(settings: ScoreSettings, plan: pa.Table, ref: CheckpointRef,
                 open_writer: Callable[[dict], DatasetWriter], run_id: str, planned: int | None = None,
                 failed_before: int = 0, on_progress=None) -> dict:
    """Score every row of ``plan`` into the writer ``open_writer(preprocessing)`` returns.

    The writer is opened once the actors report the preprocessing they apply
    (the output's lineage), and closed, or aborted on failure, here. Returns
    that preprocessing. Stops early (ErrorThresholdExceeded) once more images
    failed than the run allows of its ``planned`` total, counting
    ``failed_before`` from earlier attempts. ``on_progress`` receives a
    :class:`ProgressEvent` each time progress is logged.
    """
    placement, requested = await_placement(settings)
    # actors load the already-resolved local copy when they share this machine's
    # disk; on a remote cluster they resolve the original reference themselves, at
    # the resolved revision (hub commit), so every actor loads the weights the driver recorded
    pool = None
    try:
        pool = take_pool(pool_spec(settings, ref.source, ref.revision, placement))
        preprocessing = pool.preprocessing()
        writer = open_writer(preprocessing)
        try:
            stream_plan(settings, plan, ref, pool, writer, run_id, placement, planned, failed_before, on_progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        if pool is not None:
            pool.close()
        if requested:
            release_resources()
    return preprocessing


def stream_plan(settings: ScoreSettings, plan: pa.Table, ref: CheckpointRef, pool: ScorerPool, writer: DatasetWriter,
                run_id: str, placement: Placement, planned: int | None, failed_before: int, on_progress) -> None:
    """Stream the plan's batches through the pool's actors into ``writer``."""
    decode = {"max_pixels": settings.max_pixels, "max_bytes": settings.max_bytes,
              "fast_decode": settings.fast_decode, "device_jpeg": settings.device_decode,
              "storage_options": settings.storage_options}
    context = BatchContext(run_id, ref.name, writer.spec, decode, model_revision=ref.revision)
    decode_cpus = placement.decode_cpus
    window = window_for(decode_cpus, placement.spare_cpus, placement.num_actors, pool.spec.concurrency)
    logger.info("scoring %d images in batches of %d on %d actors (%s), %s, up to %d batches in flight per actor",
                plan.num_rows, placement.batch_size, placement.num_actors, placement.device,
                f"decode tasks of {decode_cpus:g} CPU" if decode_cpus else "decoding in the actors", window)
    progress = _Progress(plan.num_rows, settings.progress_seconds, on_progress)
    planned = planned or plan.num_rows
    limit = failure_limit(settings, planned)
    for table in pool.imap(plan_batches(plan, placement.batch_size), context, window, decode_cpus):
        writer.write(table)
        progress.update(writer.result)
        if limit is not None and failed_before + writer.result.failed > limit:
            check_failures(settings, planned, failed_before + writer.result.failed, writer.result.errors_by_type)


@dataclass(frozen=True)
class ProgressEvent:
    """Where a run stands: sent to the ``on_progress`` callback (a Prefect artifact, say)."""

    done: int  # images finished in this attempt (scored + failed)
    total: int  # images this attempt set out to score
    failed: int
    elapsed_s: float
    rate: float  # images per second since the first result (steady state, start-up excluded)


class _Progress:
    """Logs images done, rate and errors: the first result at once, then every ``every_s`` seconds and at the end."""

    def __init__(self, total: int, every_s: float, on_progress=None):
        self.total, self.every_s, self.start, self.last = total, every_s, time.monotonic(), 0.0
        self.first: tuple[float, int] | None = None  # (time, done) at the first result
        self.on_progress = on_progress

    def update(self, result: WriteResult) -> None:
        now = time.monotonic()
        done = result.scored + result.failed
        if self.first is None:
            # start-up (cluster, actors, model load) ends here; logged so it can be measured
            self.first = (now, done)
            logger.info("progress: first %d images after %.1f s", done, now - self.start)
        elif now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        logger.info("progress: %d/%d images (%.0f%%), %.1f img/s, %d failed",
                    done, self.total, 100.0 * done / max(self.total, 1), rate, result.failed)
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(done, self.total, result.failed, now - self.start, rate))


class ErrorThresholdExceeded(RuntimeError):
    """More images failed than the run allows (max_failed / max_failed_fraction)."""

    def __init__(self, message: str, failed: int = 0, errors_by_type: dict | None = None):
        super().__init__(message)
        self.failed, self.errors_by_type = failed, dict(errors_by_type or {})  # for the failed manifest

    def __reduce__(self):  # Prefect keeps a task's exception as its result: keep the counts through pickling
        return type(self), (str(self), self.failed, self.errors_by_type)


def failure_limit(settings: ScoreSettings, planned: int) -> int | None:
    """The most failed images the run tolerates, or None for no limit."""
    limits = []
    if settings.max_failed is not None:
        limits.append(settings.max_failed)
    if (fraction := settings.max_failed_fraction) is not None:
        # at least one for any share above 0: rounded down alone, 5 % of a 19-image nightly run
        # was 0, and one broken file failed it every night, its error never committed and so
        # never recorded as lasting (found in review)
        limits.append(max(int(fraction * planned), 1 if fraction > 0 else 0))
    return min(limits) if limits else None


def check_failures(settings: ScoreSettings, planned: int, failed: int, by_type: dict[str, int]) -> None:
    """Raise ErrorThresholdExceeded when ``failed`` is over the run's limit."""
    limit = failure_limit(settings, planned)
    if limit is not None and failed > limit:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]))
        share = 100.0 * failed / max(planned, 1)
        raise ErrorThresholdExceeded(
            f"{failed} of {planned} images failed ({share:.1f}%), over the limit of {limit} "
            f"(max_failed={settings.max_failed}, max_failed_fraction={settings.max_failed_fraction}); "
            f"errors: {kinds}. Nothing was committed; to commit the run with these failures, rerun it with "
            "the same --run-id and a higher --max-failed or --max-failed-fraction", failed, by_type)


def score_run(settings: ScoreSettings, run, ref: CheckpointRef, on_progress=None) -> WriteResult:
    """Score what the run's plan still lacks into staging; return the run's totals.

    Rows the run already wrote (in an earlier, interrupted attempt) are not
    scored again, so resuming never duplicates.
    """
    from .commit import check_complete, count_done, done_rows, run_files
    from .enumerate import read_plan
    from .ray_cluster import ray_session

    spec = OutputSpec(embedding_dim(ref.local_dir), float16=settings.embedding_dtype == "float16",
                      token_features=settings.token_features)
    plan = read_plan(run.plan_uri, settings.storage_options)
    # what this attempt counts: the files there now, and its own; not what another attempt of the
    # run, still running, writes meanwhile (tasks.commit.claim_run)
    earlier_files = list(run.earlier) if run.attempt else run_files(run, settings.storage_options)
    done = done_rows(run, settings.storage_options, earlier_files)
    remaining = plan.filter(pc.invert(pc.is_in(plan["uri"], done["uri"])))
    if done.num_rows:
        logger.info("resuming run %s: %d images already written, %d to go", run.run_id, done.num_rows,
                    remaining.num_rows)

    def open_writer(preprocessing: dict) -> DatasetWriter:
        metadata = {"model": ref.name, "model_revision": ref.revision or "",
                    "preprocessing": json.dumps(preprocessing, sort_keys=True, default=str),
                    "fast_decode": str(settings.fast_decode).lower(),
                    "device_decode": str(settings.device_decode).lower()}
        writers.append(DatasetWriter(run.staging_dir, model_name=ref.name, run_id=run.run_id, run_date=run.run_date,
                                     spec=spec, rows_per_file=settings.rows_per_file,
                                     checkpoint_seconds=settings.checkpoint_seconds,
                                     storage_options=settings.storage_options, metadata=metadata))
        return writers[-1]

    writers: list[DatasetWriter] = []
    if remaining.num_rows:
        with ray_session(settings.resolved_ray_address()):
            preprocessing = run_pipeline(settings, remaining, ref, open_writer, run.run_id, planned=plan.num_rows,
                                         failed_before=count_done(done)[1], on_progress=on_progress)
    else:  # nothing to score: read it here (the driver imports the model libraries only then)
        preprocessing = load_preprocessor(ref.local_dir).to_dict()
    files = earlier_files + [f for w in writers for f in w.result.files]
    final = done_rows(run, settings.storage_options, files)
    check_complete(plan, final, run)
    scored, failed, by_type = count_done(final)
    return WriteResult(scored, failed, files, by_type, preprocessing, earlier=done.num_rows)
