"""The ``score-images`` Prefect flow: plan -> score (Ray, staged) -> commit.

Its parameters are generated from :class:`tasks.settings.ScoreSettings`, so the
server validates them (types and bounds) before anything runs. Tasks exchange
small records only; images, pixels and predictions never pass through Prefect.
Every step is safe to retry: a retried or resumed run scores only what it has
not yet written, and a run enters the dataset at its commit, once.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from tasks import storage
from tasks.commit import RunTakenOver, check_claim, claim_run, commit, discard_staging, roll_forward
from tasks.pipeline import ErrorThresholdExceeded, check_failures, score_run
from tasks.plan import RunInfo, RunRefused, new_run, plan_run, resumed_run, run_checkpoint
from tasks.report import RunSummary, public_parameters, read_manifest, top_labels, write_manifest
from tasks.settings import ScoreSettings, settings_docstring, settings_signature

from . import LIBRARY_LOGGERS
from .artifacts import progress_reporter, publish_summary

logger = logging.getLogger(__name__)

# A run that committed while some images failed (under the threshold) ends in a
# Completed state with this name, so the UI and `--watch` tell it from a clean run.
COMPLETED_WITH_ERRORS = "CompletedWithErrors"


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only passing storage/network failures.

    Every step may be retried safely (a retried plan rewrites the plan, a
    retried score resumes, a retried commit moves what is left), but a missing
    object or a refused credential fails the same way again, so it fails now.
    """
    exc = state.result(raise_on_failure=False)
    transient = isinstance(exc, BaseException) and storage.is_transient(exc)
    if transient:
        logger.warning("%s failed with a passing storage or network error (%s); retrying", task.name, exc)
    return transient


# 3 retries after 10, 20 and 40 s (with jitter, so many runs do not retry in step)
_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=10),
            "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient, "cache_policy": NO_CACHE}


@task(name="plan", **_RETRIES)
def plan_task(settings: ScoreSettings, run: RunInfo) -> dict:
    """Resolve the model, list the input and write the plan: what is new, changed, skipped."""
    from deit_model import inspect_checkpoint  # reads config.json only

    ref = run_checkpoint(settings)
    counts = plan_run(settings, run, ref.name, ref.revision, inspect_checkpoint(ref.local_dir).embedding_dim)
    return {"model": ref.name, "model_revision": ref.revision, **asdict(counts)}


@task(name="score", **_RETRIES)
def score_task(settings: ScoreSettings, run: RunInfo, pinned: str | None) -> dict:
    """Score the planned images on Ray into staging, with the model revision planned; returns the run's totals."""
    ref = run_checkpoint(settings, pinned)
    result = score_run(settings, run, ref, on_progress=progress_reporter(f"run {run.run_id}"))
    return {"scored": result.scored, "failed": result.failed, "errors_by_type": result.errors_by_type,
            "attempt_images": result.scored + result.failed - result.earlier,
            "preprocessing": result.preprocessing, "files": result.files,  # what the commit may take
            "top_labels": top_labels(result.files, settings.storage_options)}


@task(name="commit", **_RETRIES)
def commit_task(summary: RunSummary, run: RunInfo, settings: ScoreSettings) -> RunSummary:
    """Move the staged files into the dataset; the manifest is written last."""
    summary = commit(summary, run, settings.storage_options)
    get_run_logger().info("run %s committed: %d listed, %d new, %d changed, %d skipped, %d scored, %d failed",
                          summary.run_id, summary.listed, summary.new, summary.changed, summary.skipped,
                          summary.scored, summary.failed)
    return summary


def _open(settings: ScoreSettings) -> tuple[RunInfo, RunSummary, bool]:
    """(run, its summary, whether it is a resumed run that already has a plan)."""
    previous = read_manifest(settings.output, settings.run_id, settings.storage_options) if settings.run_id else None
    if previous is None:
        run = new_run(settings)
        summary = RunSummary(run.run_id, "running", settings.model, settings.input, settings.output,
                             run_date=run.run_date, parameters=public_parameters(settings),
                             started_at=run.started_at)
        return run, summary, False
    previous.message = ""
    if previous.status == "committed":  # nothing to do, whatever the options (README, "Exit codes")
        run = RunInfo(previous.run_id, previous.run_date, previous.started_at, settings.output)
        try:
            resumed_run(settings, previous)
        except RunRefused as exc:
            logger.warning("%s; it is committed, so nothing was done (a new run without --run-id scores "
                           "with these options)", str(exc).split(";")[0])
        return run, previous, True
    run = resumed_run(settings, previous)
    fs, plan = storage.filesystem(run.plan_uri, settings.storage_options)
    return run, previous, fs.exists(plan)  # a run that died while planning plans again


def _library_log_level() -> None:
    # PREFECT_LOGGING_EXTRA_LOGGERS gives our loggers Prefect's API handler but
    # not its level, so under a worker (root at WARNING) their INFO records,
    # progress included, never reached the UI. Give them Prefect's level.
    level = logging.getLogger("prefect.extra").level or logging.INFO
    for name in LIBRARY_LOGGERS:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(level)


def _score_images(**params):
    _library_log_level()
    settings = ScoreSettings(**params)
    _refuse_relative_paths(settings)
    roll_forward(settings.output, settings.storage_options)  # finish commits a crash interrupted
    run, summary, resumed = _open(settings)
    if summary.status == "committed":
        logger.info("run %s is already committed; nothing to do", run.run_id)
        return summary
    summary.attempts += 1
    try:
        run = claim_run(run, settings.storage_options)
        _plan_and_score(settings, run, summary, resumed)
        check_failures(settings, summary.to_score, summary.failed, summary.errors_by_type)
        if summary.listed == 0:
            summary.message = f"no images found under {settings.input}" + (
                " that match the filters" if _filtered(settings) else "")
        t0 = time.monotonic()
        summary = commit_task(summary, run, settings)
        summary.timings_s = {**summary.timings_s, "commit": round(time.monotonic() - t0, 3)}
    except Exception as exc:
        _record_failure(summary, run, settings, exc)
        publish_summary(summary)
        raise
    publish_summary(summary)
    if summary.failed:
        return Completed(data=summary, name=COMPLETED_WITH_ERRORS,
                         message=f"{summary.failed} of {summary.scored + summary.failed} images failed "
                                 f"({_kinds(summary.errors_by_type)}); see the errors table")
    return summary


def _plan_and_score(settings: ScoreSettings, run: RunInfo, summary: RunSummary, resumed: bool) -> None:
    """Run the plan (unless resumed) and score tasks, folding their records into ``summary``."""
    t0 = time.monotonic()
    if not resumed:
        for key, value in plan_task(settings, run).items():
            setattr(summary, key, value)
    summary.status = "running"
    write_manifest(summary, run, settings.storage_options)
    t1 = time.monotonic()
    for key, value in score_task(settings, run, summary.model_revision).items():
        setattr(summary, key, value)
    timings = {"score": round(time.monotonic() - t1, 3)}
    if not resumed:
        timings = {"plan": round(t1 - t0, 3), **timings}  # a resumed run keeps its first plan time
    summary.timings_s = {**summary.timings_s, **timings}


def _refuse_relative_paths(settings: ScoreSettings) -> None:
    """A relative local input or output names a folder of whatever directory the flow runs in.

    Under a process worker that is a temporary folder, deleted after the run: a committed
    output went with it (found in review). The command line makes its paths absolute first.
    """
    for name in ("input", "output"):
        value = getattr(settings, name)
        if "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            raise RunRefused(f"{name} {value!r} is a relative path, which this flow run would take from its "
                             "own working folder (a temporary one under a process worker, deleted after the "
                             "run): pass an absolute path or a URI")


def _filtered(settings: ScoreSettings) -> bool:
    return bool(settings.include or settings.exclude or settings.modified_after or settings.modified_before)


def _kinds(by_type: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]))


def _record_failure(summary: RunSummary, run: RunInfo, settings: ScoreSettings, exc: Exception) -> None:
    # Best effort: the output itself may be what failed. The run's own error
    # is what the caller must see, so a failure here is only logged.
    try:
        check_claim(run, settings.storage_options)
    except RunTakenOver as taken:  # the run, its manifest and its staging are the later attempt's now
        logger.error("%s", taken)
        return
    except Exception:  # noqa: BLE001 - the output may be what failed: record as best we can
        pass
    try:
        # the disk's word: past the commit point the run is in the dataset whatever failed after
        # it, and "failed" there would hide it from planning
        on_disk = read_manifest(settings.output, run.run_id, settings.storage_options)
    except Exception:  # noqa: BLE001
        on_disk = None
    status = on_disk.status if on_disk is not None else None
    if status in ("committing", "committed"):
        # the manifest already lists every file: the next run on this output
        # finishes the move (roll_forward) rather than losing or repeating it
        logger.error("run %s failed while %s (%s); %s", run.run_id, status, exc,
                     "the next run will finish the commit" if status == "committing" else "its data is committed")
        return
    summary.status, summary.message = "failed", f"{type(exc).__name__}: {exc}"[:2000]
    try:
        if isinstance(exc, ErrorThresholdExceeded):
            # the manifest says how many failed, as the message does, though none of it is kept
            summary.failed, summary.errors_by_type = exc.failed, exc.errors_by_type
            discard_staging(run, settings.storage_options)  # a rerun starts this run afresh
        write_manifest(summary, run, settings.storage_options)
    except Exception:  # noqa: BLE001
        logger.warning("could not record the failure of run %s", run.run_id, exc_info=True)


_score_images.__signature__ = settings_signature()
_score_images.__annotations__ = {
    name: p.annotation for name, p in _score_images.__signature__.parameters.items()}
_score_images.__doc__ = settings_docstring(
    "Score images under `input` with a DeiT model and write Parquet to `output`.")


def _run_name() -> str:
    """Flow run names say what ran: '<model>-on-<input folder>'."""
    params = flow_run.parameters
    model = str(params.get("model", "")).rstrip("/").rsplit("/", 1)[-1]
    source = str(params.get("input", "")).rstrip("/").rsplit("/", 1)[-1]
    return f"{model}-on-{source}"[:100]


score_images = flow(
    name="score-images",
    flow_run_name=_run_name,
    validate_parameters=True,
    log_prints=False,
)(_score_images)
