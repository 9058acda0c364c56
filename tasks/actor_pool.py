"""The scoring actors and the stream of batches through them.

A pool is ``num_actors`` Ray actors, each holding a :class:`ScoringActor`. It
needs only the model and the placement, not the run, so the command line
starts it as soon as Ray is up (``tasks.early_pool``): the actors import
torch and load the weights while Prefect starts and the plan is written,
instead of after (on 2 cores that was 10 s of the start-up).

Batches go to the least busy actor, at most ``window`` calls per actor in
flight, so memory in flight is bounded and no per-image state accumulates
in the driver. With decode tasks (``decode_cpus`` > 0) each batch is first a
stateless Ray task that reads, decodes and preprocesses it; the actor call
takes that task's result, so decoding runs on other CPUs while actors score.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from . import crashes
from .actor_watch import SIGNAL_EVERY_S, ActorWatch
from .decode import decode_task_for
from .score import BatchContext, ScoringActor

logger = logging.getLogger(__name__)

# An actor killed (out of memory, a lost node, a crashing decoder) is restarted, always, and
# its calls retried up to CALL_RETRIES times; what then still dies, tasks/crashes.py handles.
CALL_RETRIES = 3
MAX_WINDOW = 64  # calls in flight per actor, at most
# A GPU actor runs two calls at once: while one batch is on the GPU the other's pixels are
# copied and its rows built, which would otherwise leave the GPU idle between batches.
GPU_CONCURRENCY = 2
# A CPU actor that reads its own images runs two as well, but only one decodes and scores at a
# time (on ScoringActor's one CPU-work thread): the other call reads its batch meanwhile, so the core does not
# wait for storage (one round trip per batch, tens of ms on S3). Fed by decode tasks, it runs one.
READ_AHEAD_CONCURRENCY = 2


@dataclass(frozen=True)
class PoolSpec:
    """What makes two pools interchangeable: the model the actors load and where they run."""

    model: str  # the reference the actors resolve (a local copy when they share this disk)
    revision: str | None
    device: str
    dtype: str
    top_k: int
    storage_options: str  # JSON, so the spec compares and hashes
    num_actors: int
    num_cpus: float
    num_gpus: float
    concurrency: int = 1  # calls an actor runs at once (threads)
    uint8_pixels: bool = False  # decode tasks send uint8 pixels, which the actors normalise

    def checkpoint(self) -> tuple:
        """What a decode worker loads the preprocessing from (tasks.decode's cache key)."""
        return self.model, self.revision, self.storage_options

    def actor_kwargs(self) -> dict:
        return {"model": self.model, "revision": self.revision, "device": self.device, "dtype": self.dtype,
                "top_k": self.top_k, "storage_options": json.loads(self.storage_options)}


def pool_spec(settings, model: str, revision: str | None, placement) -> PoolSpec:
    """The pool a run with ``settings`` and this placement needs.

    GPU actors get uint8 pixels from decode tasks: a quarter of the bytes through the object
    store and over PCIe, and 17 % less decode CPU per image; normalising them is one kernel.
    CPU actors get finished float32 pixels: there the actor's core bounds the run, and
    normalising would add 0.28 ms of it per image (benchmarks/decode_stage.py). CPU actors
    that read their own images take a second call, whose read overlaps the first's work.
    """
    if placement.device == "cuda":
        concurrency = GPU_CONCURRENCY
    else:
        concurrency = READ_AHEAD_CONCURRENCY if placement.decode_cpus <= 0 else 1
    return PoolSpec(model, revision, placement.device, settings.dtype, settings.top_k,
                    json.dumps(settings.storage_options, sort_keys=True, default=str),
                    placement.num_actors, placement.num_cpus, placement.num_gpus,
                    concurrency=concurrency, uint8_pixels=placement.device == "cuda")


class ScorerPool:
    """``spec.num_actors`` scoring actors; :meth:`imap` streams batches through them."""

    def __init__(self, spec: PoolSpec, stagger: bool = False, actor_cls: type = ScoringActor):
        """Start the actors; with ``stagger``, the others only once the first is up (it waits)."""
        import ray

        self.spec = spec
        cls = ray.remote(actor_cls).options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_concurrency=spec.concurrency,
            max_restarts=-1, max_task_retries=CALL_RETRIES)
        logger.info("pool: starting %d scoring actors (%s, %g CPU, %g GPU each)%s", spec.num_actors,
                    spec.device, spec.num_cpus, spec.num_gpus, ", the others once the first is up" if stagger else "")
        self.actors = [cls.remote(**spec.actor_kwargs())]
        if stagger and spec.num_actors > 1:
            # On a few cores shared with Prefect and the driver, actors that import torch
            # side by side are all ready late; alone, the first is ready seconds sooner and
            # scores while the others start, for the same CPU in all.
            self.preprocessing()
        self.actors += [cls.remote(**spec.actor_kwargs()) for _ in range(spec.num_actors - 1)]

    def preprocessing(self) -> dict:
        """The preprocessing the actors apply (for lineage); waits for the first actor to be up."""
        import ray

        ref = self.actors[0].preprocessing.remote()
        self._wait([ref])
        return ray.get(ref)

    def imap(self, batches: Iterable[dict], context: BatchContext, window: int = 2,
             decode_cpus: float = 0.0) -> Iterator[pa.Table]:
        """Score ``batches`` (plan rows); yield one table per batch as each finishes (any order).

        ``context.decode`` holds the decode options. With ``decode_cpus`` > 0
        each batch is decoded by a Ray task of that many CPUs first, and the
        actors receive decoded rows; otherwise the actors decode.

        A batch whose process died on every retry is a suspect: once nothing
        else is in flight it runs alone, so a death is its own, and is halved
        until the image that kills its process is alone; that image becomes a
        ``process_died`` error row and the rest is scored.
        """
        import ray

        call = self._caller(context, decode_cpus)
        in_flight: dict = {}  # result ref -> (actor index, batch, whether it runs alone)
        load = [0] * len(self.actors)
        suspects: list[dict] = []
        died, source = 0, iter(batches)
        while True:
            if not suspects:
                for batch in itertools.islice(source, max(0, window * len(self.actors) - len(in_flight))):
                    i = min(range(len(load)), key=load.__getitem__)
                    in_flight[call(self.actors[i], batch)] = (i, batch, False)
                    load[i] += 1
            elif not in_flight:
                self._wait_up(self.actors[0])  # a restarting actor is not this batch's death
                batch = suspects.pop()
                in_flight[call(self.actors[0], batch, alone=True)] = (0, batch, True)
                load[0] += 1
            if not in_flight:
                return
            [ref] = self._wait(list(in_flight))
            i, batch, alone = in_flight.pop(ref)
            load[i] -= 1
            try:
                table = ray.get(ref)  # an error the code raised is raised here, as the run's
            except crashes.deaths() as exc:
                # only a death alone is surely its batch's: the calls in flight beside the one that
                # killed a process die with it, and counting them let one poison image fail a run
                died += alone
                if died > crashes.CRASH_BUDGET:
                    raise crashes.ScoringProcessDied(f"scoring processes died {died} times; the last on "
                                                     f"{crashes.describe(batch)}: {exc}") from exc
                table = crashes.after_death(batch, alone, exc, suspects, context)
            if table is not None:
                yield table

    def _caller(self, context: BatchContext, decode_cpus: float):
        """``call(actor, batch, alone=False) -> ref``: one batch's decode task (if any) and actor call."""
        import ray

        decode_task = None
        if decode_cpus > 0:
            options = {**context.decode, "checkpoint": self.spec.checkpoint(), "uint8": self.spec.uint8_pixels}
            decode_task, decode_ref = decode_task_for(decode_cpus), ray.put(options)
            context = replace(context, decode=None)
        context_ref = ray.put(context)

        def call(actor, batch: dict, alone: bool = False):
            # alone, a suspect is not retried: its first death is the evidence
            arg = batch
            if decode_task is not None:
                arg = (decode_task.options(max_retries=0) if alone else decode_task).remote(batch, decode_ref)
            method = actor.score_batch.options(max_task_retries=0) if alone else actor.score_batch
            return method.remote(arg, context_ref)
        return call

    def _wait(self, refs: list) -> list:
        """``ray.wait`` for one of ``refs`` in short waits, watching the actors (tasks/actor_watch.py).

        Short, so that a signal Ray leaves for later is handled within SIGNAL_EVERY_S; a
        handler's exception that Ray wraps comes out as itself (``signals_unwrapped``).
        """
        import ray

        from .ray_cluster import signals_unwrapped

        watch = ActorWatch(self.actors)
        while True:
            with signals_unwrapped():
                ready, _ = ray.wait(refs, num_returns=1, timeout=SIGNAL_EVERY_S)
            if ready:
                return ready
            watch.check()

    def _wait_up(self, actor, timeout: float = 300.0) -> None:
        """Return once ``actor`` answers (it may be restarting after a death)."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout
        while True:
            try:
                ref = actor.preprocessing.remote()
                self._wait([ref])
                ray.get(ref)
                return
            except ActorUnavailableError:  # restarting: ask again
                if time.monotonic() > deadline:
                    raise crashes.ScoringProcessDied(
                        f"the scoring actor did not come back within {timeout:g} s") from None
                time.sleep(0.5)
            except crashes.deaths() as exc:
                raise crashes.ScoringProcessDied(f"no scoring actor could be started again: {exc}") from exc

    def close(self) -> None:
        """Stop the actors (on a shared cluster they would otherwise hold their CPUs and GPUs)."""
        import ray

        if ray.is_initialized():  # after Ray's shutdown they are gone already
            for actor in self.actors:
                ray.kill(actor)
        self.actors = []


def plan_batches(plan: pa.Table, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The plan's rows as numpy batches of ``batch_size`` (the last one shorter).

    Columns become numpy arrays, so a batch is pickled alone: an Arrow slice
    could carry its whole parent's buffers into every call.
    """
    for start in range(0, plan.num_rows, batch_size):
        chunk = plan.slice(start, batch_size)
        yield {name: chunk.column(name).to_numpy() for name in chunk.column_names}


def decode_tasks(decode_cpus: float, spare_cpus: float) -> int:
    """Decode tasks that run at once on the CPUs the actors leave (none where the actors decode)."""
    return int(spare_cpus // decode_cpus) if decode_cpus > 0 else 0


def window_for(decode_cpus: float, spare_cpus: float, num_actors: int, concurrency: int = 1) -> int:
    """Calls in flight per actor: those it runs at once, one queued, plus one per decode task it can use."""
    least = concurrency + 1
    if decode_cpus <= 0:
        return least
    tasks = decode_tasks(decode_cpus, spare_cpus)
    return max(least, min(MAX_WINDOW, -(-tasks // max(num_actors, 1)) + 1))
