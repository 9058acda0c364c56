"""A scoring pool started before the run needs it, and handed to the run.

The pool needs only the model and the placement, not the run, so the command
line starts it as soon as Ray is up (:func:`start_early`, on Ray's start-up
thread). The run then takes it if it matches (:func:`take_pool`) or starts
its own; one that no run took is stopped (:func:`discard_early`). The decode
workers are readied at the same time (:func:`warm_decode_workers`).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from .actor_pool import PoolSpec, ScorerPool, decode_tasks

logger = logging.getLogger(__name__)


class _Early:
    """A pool being started by :func:`start_early`: its future, and whether nobody wants it any more."""

    def __init__(self, spec: PoolSpec):
        self.spec, self.future, self.discarded = spec, Future(), False


_early: _Early | None = None
_lock = threading.Lock()


def start_early(spec: PoolSpec, stagger: bool = False) -> None:
    """Start a pool for ``spec`` now, for :func:`take_pool` to hand to the run.

    Blocks while a staggered pool's first actor starts (call it on a thread).
    A pool discarded meanwhile is stopped once it is up.
    """
    global _early
    early = _Early(spec)
    with _lock:
        previous, _early = _early, early
    if previous is not None:
        _discard(previous)
    try:
        pool = ScorerPool(spec, stagger=stagger)
    except BaseException as exc:
        with _lock:
            early.future.set_exception(exc)
            discarded = early.discarded
        if discarded:  # e.g. Ray was shut down under it: nobody is waiting
            return
        raise
    with _lock:  # with _discard's check, so exactly one of them stops a discarded pool
        early.future.set_result(pool)
        discarded = early.discarded
    if discarded:
        pool.close()


def take_pool(spec: PoolSpec) -> ScorerPool:
    """The pool started early if it matches ``spec`` (it is then the caller's), else a new one.

    Waits for an early pool that is still starting its first actor; the run
    needs an actor up before it can score anyway.
    """
    global _early
    with _lock:
        early, _early = _early, None
    pool = None
    if early is not None:
        try:
            pool = early.future.result()
        except Exception as exc:  # noqa: BLE001 - a new pool reports the same error as the run's
            logger.warning("pool: the actors started early failed (%s); starting others", exc)
    if pool is not None and pool.spec == spec:
        logger.info("pool: using the %d actors started with Ray", len(pool.actors))
        return pool
    if pool is not None:
        logger.info("pool: the actors started early do not match this run (%s); starting others", pool.spec)
        pool.close()
    return ScorerPool(spec)


def discard_early() -> None:
    """Stop a pool that :func:`start_early` began and no run took (at once, or once it is up)."""
    global _early
    with _lock:
        early, _early = _early, None
    if early is not None:
        _discard(early)


def _discard(early: _Early) -> None:
    with _lock:
        early.discarded = True
        done = early.future.done()
    if done and early.future.exception() is None:
        early.future.result().close()


def warm_decode_workers(spec: PoolSpec, decode_cpus: float, spare_cpus: float) -> list:
    """Start the run's decode workers now, one per decode task the spare CPUs hold: their refs.

    Why: Ray starts a worker process when a task first needs one, and a decode worker's first
    batch then waits for it to import torch and the model libraries and load the checkpoint's
    preprocessing. Started with the actors, that happens while the actors load their weights
    and Prefect plans the run, not after scoring starts (on the H200 machine the first result
    came 13 s after scoring started, with 15 decode workers starting at once). Nothing waits
    for the refs; Ray keeps the idle workers for the decode tasks.
    """
    from .decode import warm_task_for

    if decode_cpus <= 0:
        return []
    task = warm_task_for(decode_cpus)
    return [task.remote(spec.checkpoint()) for _ in range(decode_tasks(decode_cpus, spare_cpus))]
