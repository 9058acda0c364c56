"""Connect to Ray: an existing cluster by address, or a local one we start and stop.

Starting a local cluster takes 5 to 10 s on a small machine, about as long
as Prefect's temporary server. :func:`start_early` lets the command line
start Ray (and then the scoring actors) while Prefect is still starting;
:func:`ray_session` then picks up the cluster it started instead of
starting another.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

_early: Future | None = None  # a start begun by start_early, not yet taken by ray_session
_release = threading.Event()  # set when the early-started cluster is shut down
_lock = threading.Lock()


def _init(address: str | None) -> None:
    import ray

    # A local cluster we start would prestart one idle worker per CPU for this
    # driver. Ray Data never uses them (its tasks carry their own runtime env and
    # its actors get fresh processes), so on a small machine they only take CPU
    # from the start-up. A cluster we join keeps its own setting.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=True)
    # with no address, ray.init joins a cluster already running on this machine
    # (ray start) or starts a private one; either way it is ours to disconnect from
    logger.info("ray: connected to %s with %s", address or "a local cluster", ray.cluster_resources())


def start_early(address: str | None, then: Callable[[], None] | None = None) -> None:
    """Begin connecting to (or starting) Ray on a background thread; returns at once.

    Once connected the thread calls ``then`` (the command line starts the
    scoring actors there); its failure is only logged, as the run will start
    what it needs itself. A failure to connect surfaces in :func:`ray_session`,
    where the run would have started Ray anyway.
    """
    import ray

    global _early
    if ray.is_initialized():  # already connected (an embedding program, a test): nothing to start
        if then is not None:
            threading.Thread(target=_then, args=(then,), name="ray-early-then", daemon=True).start()
        return
    with _lock:
        if _early is not None:
            return
        _early = Future()
        _release.clear()
    fut = _early

    def work() -> None:
        try:
            _init(address)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the session
            fut.set_exception(exc)
            return
        # before the session is handed over, so the run finds what `then` started; a
        # staggered pool's first actor is waited for here, as the run would wait for it anyway
        _then(then)
        fut.set_result(None)
        # Ray's GCS and raylet die with the *thread* that started them
        # (PR_SET_PDEATHSIG), so this thread lives until the cluster is shut down
        _release.wait()

    threading.Thread(target=work, name="ray-early-start", daemon=True).start()


def _then(then: Callable[[], None] | None) -> None:
    if then is None:
        return
    try:
        then()
    except Exception:  # noqa: BLE001 - an optimisation only; the run starts what it needs itself
        logger.warning("%s failed once Ray was up; the run will do without it", then, exc_info=True)


def _take_early() -> Future | None:
    """The pending early start, now owned by the caller (None if there is none)."""
    global _early
    with _lock:
        fut, _early = _early, None
    return fut


def stop_early() -> None:
    """Shut down a cluster that :func:`start_early` began and no session took (nothing was scored)."""
    fut = _take_early()
    if fut is None:
        return
    try:
        fut.result()
    except BaseException:  # noqa: BLE001 - it never served a run; nothing to report
        logger.debug("early Ray start had failed", exc_info=True)
        _release.set()
        return  # it connected to nothing, so there is nothing of ours to shut down
    _shutdown()


def _shutdown() -> None:
    import ray

    try:
        ray.shutdown()
    finally:
        _release.set()


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the already-initialised Ray, else connect to ``address``, else start locally.

    A cluster this function (or :func:`start_early`) started is shut down on
    exit; one it merely joined (or found initialised) is left running.
    """
    import ray

    fut = _take_early()
    if fut is not None:
        fut.result()  # the early start's error, if any, is this session's
    elif ray.is_initialized():
        yield
        return
    else:
        _init(address)
    try:
        yield
    finally:
        _shutdown()


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


@contextmanager
def signals_unwrapped() -> Iterator[None]:
    """Re-raise what a signal handler raised inside a blocking Ray call, not Ray's SystemError.

    Why: while ``ray.wait`` blocks, an exception from a Python signal handler other than
    KeyboardInterrupt (Prefect's TerminationSignal, on SIGTERM) comes out as ``SystemError:
    <cyfunction CoreWorker.wait> returned a result with an exception set``, its cause the
    handler's exception. Prefect then took the SIGTERM for a crash, and the command exited 1
    instead of 130 with its resume line (found in review).
    """
    try:
        yield
    except SystemError as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, Exception):  # a BaseException: a signal's, not code's
            raise cause from None
        raise
