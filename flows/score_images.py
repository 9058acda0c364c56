"""The ``score-images`` Prefect flow: plan -> score (Ray) -> report.

Its parameters are generated from :class:`tasks.settings.ScoreSettings`, so the
server validates them (types and bounds) before anything runs. Tasks exchange
small records only; images, pixels and predictions never pass through Prefect.
"""
from __future__ import annotations

import logging
import time

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.cache_policies import NO_CACHE

from deit_model import resolve_checkpoint
from tasks.enumerate import read_plan
from tasks.pipeline import score_run
from tasks.plan import RunInfo, new_run, plan_run
from tasks.report import RunSummary, public_parameters, write_manifest
from tasks.settings import ScoreSettings, settings_docstring, settings_signature

logger = logging.getLogger(__name__)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(settings: ScoreSettings, run: RunInfo) -> int:
    """List the input into the run's plan file."""
    return plan_run(settings, run)


@task(name="score", cache_policy=NO_CACHE)
def score_task(settings: ScoreSettings, run: RunInfo) -> dict:
    """Score the planned images on Ray and write Parquet; returns counts and files."""
    ref = resolve_checkpoint(settings.model, settings.revision, settings.storage_options)
    plan = read_plan(run.plan_uri, settings.storage_options)
    result = score_run(settings, run, ref, plan)
    return {"model": ref.name, "model_revision": ref.revision, "preprocessing": result.preprocessing,
            "scored": result.scored, "failed": result.failed,
            "errors_by_type": result.errors_by_type, "files": result.files}


@task(name="report", cache_policy=NO_CACHE)
def report_task(summary: RunSummary, run: RunInfo, settings: ScoreSettings) -> str:
    """Write the run manifest and log the summary."""
    uri = write_manifest(summary, run, settings.storage_options)
    get_run_logger().info("run %s %s: %d listed, %d scored, %d failed; manifest %s", summary.run_id,
                          summary.status, summary.listed, summary.scored, summary.failed, uri)
    return uri


def _score_images(**params) -> RunSummary:
    settings = ScoreSettings(**params)
    run = new_run(settings)
    summary = RunSummary(run.run_id, "failed", settings.model, settings.input, settings.output,
                         parameters=public_parameters(settings), started_at=run.started_at)
    try:
        t0 = time.monotonic()
        summary.listed = plan_task(settings, run)
        t1 = time.monotonic()
        outcome = score_task(settings, run)
        summary.timings_s = {"plan": round(t1 - t0, 3), "score": round(time.monotonic() - t1, 3)}
    except Exception as exc:
        summary.message = f"{type(exc).__name__}: {exc}"[:2000]
        _report_failure(summary, run, settings)
        raise
    for key, value in outcome.items():
        setattr(summary, key, value)
    summary.status = "completed"
    if summary.listed == 0:
        summary.message = f"no images found under {settings.input}"
    report_task(summary, run, settings)
    return summary


def _report_failure(summary: RunSummary, run: RunInfo, settings: ScoreSettings) -> None:
    # Best effort: the output itself may be what failed. The run's own error
    # is what the caller must see, so a failure here is only logged.
    try:
        write_manifest(summary, run, settings.storage_options)
    except Exception:  # noqa: BLE001
        logger.warning("could not write the manifest of failed run %s", run.run_id, exc_info=True)


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
