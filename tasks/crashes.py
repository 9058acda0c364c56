"""Scoring processes that die: which batch killed them, and when a run gives up.

A batch whose process died on every retry (a decoder that segfaults on one
image, an out-of-memory kill) is a suspect. :class:`~tasks.actor_pool.ScorerPool`
runs suspects alone, once nothing else is in flight, so that a death is the
suspect's own and no neighbouring batch is blamed; :func:`after_death` halves a
suspect that dies alone until the one image is left, which becomes a
``process_died`` error row, and the rest is scored. Past ``CRASH_BUDGET``
deaths in a run, the run fails (resumable, as any failed run).
"""
from __future__ import annotations

import logging

from .score import BatchContext, process_error_rows

logger = logging.getLogger(__name__)

CRASH_BUDGET = 16  # calls run alone (surely their batch's deaths) that may die before the run fails


class ScoringProcessDied(RuntimeError):
    """Scoring processes died more often than a run allows (CRASH_BUDGET), or could not restart."""


def deaths() -> tuple:
    """The Ray errors that mean a call's process died, not that its code raised."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.OutOfMemoryError, rex.NodeDiedError)


def after_death(batch: dict, alone: bool, exc: Exception, suspects: list, context: BatchContext):
    """A died call's batch becomes a suspect, or two halves to try alone, or (one image alone) its error row."""
    n = len(batch["uri"])
    if alone and n == 1:
        logger.warning("pool: the scoring process died on %s each time; it becomes an error row", batch["uri"][0])
        return process_error_rows(batch, context, f"the scoring process died on this image each time: {exc}")
    if alone:
        half = n // 2
        suspects += [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]
    else:
        logger.warning("pool: the scoring process died on %s; running it alone", describe(batch))
        suspects.append(batch)
    return None


def describe(batch: dict) -> str:
    """A batch in a message: its size and first URI."""
    uris = batch["uri"]
    return f"a batch of {len(uris)} images ({uris[0]}{', ...' if len(uris) > 1 else ''})"
