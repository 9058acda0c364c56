"""The driver's watch over its scoring actors while it waits for their results.

Ray restarts a dead actor for ever and holds its calls meanwhile, so a call to an actor
that never comes back (its restart waits for a GPU that a lost node took with it, or its
process dies as it starts) would be waited for for ever. :class:`ActorWatch` fails the
run instead (:class:`~tasks.crashes.ScoringProcessDied`).
"""
from __future__ import annotations

import functools
import logging
import time

from .crashes import ScoringProcessDied

logger = logging.getLogger(__name__)

# An actor that stays down this long (restarting, or waiting for a GPU that a lost node took
# with it) fails the run instead of hanging it; so does one that restarts this many times
# without a result coming back (a process dying as it starts).
ACTOR_DOWN_LIMIT_S = 600.0
ACTOR_RESTART_LIMIT = 10
WATCH_EVERY_S = 30.0
# Ray does not always run Python's signal handlers while ray.wait blocks: in the test suite a
# SIGTERM was handled only once the wait returned. Waits of at most this long bound how late a
# SIGTERM stops the run (Kubernetes sends SIGKILL 30 s after it); a wait of 30 s did not.
SIGNAL_EVERY_S = 1.0


class ActorWatch:
    """Checks, every WATCH_EVERY_S, that no actor has been down too long or restarted too often."""

    def __init__(self, actors: list):
        self.actors = actors
        self.first: dict[int, tuple[float, int]] = {}  # actor index -> (when first seen down, its restarts)
        self.last = time.monotonic()

    def check(self) -> None:
        """Raise ScoringProcessDied for an actor down past the limits; ask Ray at most every WATCH_EVERY_S."""
        now = time.monotonic()
        if now - self.last < WATCH_EVERY_S:
            return
        self.last = now
        for i, (state, restarts) in enumerate(actor_states(self.actors)):
            if state in (None, "ALIVE"):
                self.first.pop(i, None)
                continue
            since, restarts_then = self.first.setdefault(i, (now, restarts))
            if now - since > ACTOR_DOWN_LIMIT_S or restarts - restarts_then >= ACTOR_RESTART_LIMIT:
                raise ScoringProcessDied(
                    f"scoring actor {i} has been {state} for {now - since:.0f} s and restarted "
                    f"{restarts - restarts_then} times meanwhile: its process dies as it starts, or the "
                    "resources it needs are gone (a lost node); fix that and rerun the run's id")


def actor_states(actors: list) -> list[tuple[str | None, int]]:
    """(state, restarts) of each actor as Ray's control store has them; (None, 0) where it cannot say.

    Asked from a task with no CPU, inside the cluster: a driver connected through Ray Client
    (``ray://``, as the Kubernetes work pool's runs are) has no control-store client of its
    own, and the call made there only raised (tasks/placement.py asks the autoscaler so too).
    """
    import ray

    ids = [actor._actor_id.hex() for actor in actors]
    try:
        return [tuple(s) for s in ray.get(_states_task().remote(ids), timeout=WATCH_EVERY_S)]
    except Exception:  # noqa: BLE001 - a wedged cluster or another Ray: the watch only stays blind
        logger.debug("pool: the actors' states could not be read", exc_info=True)
        return [(None, 0)] * len(ids)


def _actor_states_in_cluster(ids: list[str]) -> list[tuple[str | None, int]]:
    import ray._private.state as ray_state  # no public call without the dashboard, which is off

    states = []
    for actor_id in ids:
        try:
            info = ray_state.actors(actor_id=actor_id)
            states.append((info.get("State"), int(info.get("NumRestarts") or 0)))
        except Exception:  # noqa: BLE001 - an actor Ray no longer knows
            states.append((None, 0))
    return states


@functools.lru_cache(maxsize=None)
def _states_task():
    import ray

    return ray.remote(num_cpus=0, max_retries=1)(_actor_states_in_cluster)
