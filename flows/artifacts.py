"""What a run shows in the Prefect UI: a live progress bar and an end-of-run summary.

Artifacts are a view, never the record (the run's manifest is): a failure to
write one is logged and the run goes on.
"""
from __future__ import annotations

import logging
from typing import Callable

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact

from tasks.pipeline import ProgressEvent
from tasks.report import RunSummary

logger = logging.getLogger(__name__)

# Keys group each run's artifact with earlier runs' in the UI's Artifacts page.
PROGRESS_KEY = "score-images-progress"
SUMMARY_KEY = "score-images-summary"
COUNTS_KEY = "score-images-counts"


def progress_reporter(description: str) -> Callable[[ProgressEvent], None]:
    """A callback for :func:`tasks.pipeline.run_pipeline` that keeps a progress artifact current."""
    try:
        artifact_id = create_progress_artifact(0.0, key=PROGRESS_KEY, description=description)
    except Exception:  # noqa: BLE001 - the UI view is optional, the scoring is not
        logger.warning("could not create the progress artifact", exc_info=True)
        return lambda event: None

    def report(event: ProgressEvent) -> None:
        pct = 100.0 * event.done / max(event.total, 1)
        text = (f"{description}: {event.done}/{event.total} images, {event.failed} failed, "
                f"{event.rate:.1f} img/s")
        try:
            update_progress_artifact(artifact_id, pct, description=text)
        except Exception:  # noqa: BLE001
            logger.warning("could not update the progress artifact", exc_info=True)

    return report


# the run's counts, in the order the UI shows them (plan, then outcome)
COUNTS = ("listed", "new", "changed", "skipped", "failed_before", "to_score", "scored", "failed")


def summary_rows(summary: RunSummary) -> list[dict]:
    """The run's figures as (section, item, value) rows for a table artifact."""
    rows = [("outcome", "status", summary.status), ("outcome", "model", summary.model),
            ("outcome", "model revision", summary.model_revision or "")]
    for name in COUNTS:
        rows.append(("counts", name, getattr(summary, name)))
    rows += [("errors", kind, n) for kind, n in sorted(summary.errors_by_type.items(), key=lambda kv: -kv[1])]
    rows += [("time (s)", stage, round(seconds, 2)) for stage, seconds in summary.timings_s.items()]
    rows.append(("throughput", "images/s while scoring", round(summary.throughput, 2)))
    rows += [("top labels", label, n) for label, n in summary.top_labels.items()]
    return [{"section": s, "item": i, "value": v} for s, i, v in rows]


def summary_markdown(summary: RunSummary) -> str:
    """A short report of the run for the flow run's Artifacts tab."""
    def table(header: tuple[str, str], items: dict) -> str:
        lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
        return "\n".join(lines + [f"| {k} | {v} |" for k, v in items.items()]) if items else "none"

    counts = {k: getattr(summary, k) for k in COUNTS}
    timings = {k: f"{v:.1f}" for k, v in summary.timings_s.items()}
    return "\n\n".join([
        f"# Run `{summary.run_id}`: {summary.status}",
        f"Model `{summary.model}` (`{summary.model_revision or 'unknown revision'}`), "
        f"input `{summary.input}`, output `{summary.output}`.",
        "## Counts\n" + table(("", "images"), counts),
        "## Errors by type\n" + table(("error", "images"), summary.errors_by_type),
        "## Time per stage\n" + table(("stage", "seconds"), timings)
        + f"\n\nThroughput while scoring: **{summary.throughput:.1f} images/s**.",
        "## Most frequent labels (top-1)\n" + table(("label", "images"), summary.top_labels),
        f"{len(summary.files)} data files. {summary.message}".strip(),
    ])


def publish_summary(summary: RunSummary) -> None:
    """Attach the run's summary to the flow run as a table and a markdown artifact."""
    try:
        create_table_artifact(summary_rows(summary), key=COUNTS_KEY,
                              description=f"run {summary.run_id}: counts, errors, timings, labels")
        create_markdown_artifact(summary_markdown(summary), key=SUMMARY_KEY,
                                 description=f"run {summary.run_id}: {summary.status}")
    except Exception:  # noqa: BLE001
        logger.warning("could not publish the summary artifacts", exc_info=True)
