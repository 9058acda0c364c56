"""Ray started early by the command line, and handed to the run's session.

The real start (a local cluster begun on a thread while Prefect starts) runs
in every CLI test that scores, such as the demo's subprocess; these check the
hand-over rules with the cluster start replaced, since a second real cluster
cannot start beside the session's.
"""
from __future__ import annotations

import threading

import pytest

from tasks import ray_cluster


@pytest.fixture
def fake_ray(monkeypatch):
    """Record starts and shutdowns instead of touching the session's Ray cluster."""
    import ray

    calls = []
    monkeypatch.setattr(ray_cluster, "_init", lambda address: calls.append(("init", address)))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    yield calls
    ray_cluster.stop_early()


def _starter_alive() -> bool:
    return any(t.name == "ray-early-start" and t.is_alive() for t in threading.enumerate())


def test_session_takes_the_early_start_and_shuts_it_down(fake_ray):
    ray_cluster.start_early("ray://head:10001")
    with ray_cluster.ray_session("ray://head:10001"):
        assert fake_ray == [("init", "ray://head:10001")]  # started once, not again by the session
        assert _starter_alive()  # Ray's daemons die with the thread that started them
    assert fake_ray[-1] == ("shutdown",)
    for thread in threading.enumerate():
        if thread.name == "ray-early-start":
            thread.join(timeout=5)
    assert not _starter_alive()  # and it ends once the cluster is down


def test_early_failure_is_the_sessions_error(fake_ray, monkeypatch):
    def refuse(address):
        raise ConnectionError("no cluster at ray://nowhere:1")

    monkeypatch.setattr(ray_cluster, "_init", refuse)
    ray_cluster.start_early("ray://nowhere:1")
    with pytest.raises(ConnectionError, match="nowhere"):
        with ray_cluster.ray_session("ray://nowhere:1"):
            pass


def test_nothing_starts_when_ray_is_already_connected(fake_ray, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    ray_cluster.start_early(None, then=lambda: fake_ray.append(("then",)))
    ray_cluster.stop_early()  # must not shut down a cluster that someone else connected to
    with ray_cluster.ray_session(None):
        pass
    for thread in threading.enumerate():
        if thread.name == "ray-early-then":  # what was to follow the start runs on its own thread
            thread.join(timeout=5)
    assert fake_ray == [("then",)]  # and still happens, once


def test_what_follows_the_start_runs_after_it_and_may_fail(fake_ray):
    def then():
        fake_ray.append(("then",))
        raise RuntimeError("no actors today")

    ray_cluster.start_early(None, then=then)
    with ray_cluster.ray_session(None):  # its failure is not the session's
        assert fake_ray == [("init", None), ("then",)]


def test_a_failed_early_start_shuts_nothing_down(fake_ray, monkeypatch):
    def refuse(address):
        raise ConnectionError("refused")

    monkeypatch.setattr(ray_cluster, "_init", refuse)
    ray_cluster.start_early(None)
    ray_cluster.stop_early()
    assert fake_ray == []


def test_an_unused_early_start_is_shut_down(fake_ray):
    ray_cluster.start_early(None)
    ray_cluster.stop_early()
    assert fake_ray == [("init", None), ("shutdown",)]
    ray_cluster.stop_early()  # nothing left to stop
    assert fake_ray == [("init", None), ("shutdown",)]


def test_a_sigterm_while_the_pool_waits_comes_out_as_the_handlers_exception_at_once(ray_cluster):
    """Ray's blocking wait turned the handler's exception into a SystemError, and Prefect took
    SIGTERM for a crash (exit 1). And Ray at times ran the handler only once the wait returned:
    a run then stopped up to 30 s late (the watch's wait), when Kubernetes sends SIGKILL."""
    import _thread
    import signal
    import time

    import ray

    from tasks.actor_pool import ScorerPool

    class Stopped(BaseException):  # as Prefect's TerminationSignal: not an Exception
        pass

    def handler(signum, frame):
        raise Stopped

    @ray.remote(num_cpus=0)
    def slow() -> None:
        time.sleep(60)

    pool = object.__new__(ScorerPool)  # its wait alone, over a call that takes a minute
    pool.actors = []
    ref = slow.remote()
    previous = signal.signal(signal.SIGTERM, handler)
    # SIGTERM as the main thread's handler sees it, without the OS choosing a thread
    timer = threading.Timer(1.0, _thread.interrupt_main, (signal.SIGTERM,))
    start = time.monotonic()
    try:
        timer.start()
        with pytest.raises(Stopped):
            pool._wait([ref])
        assert time.monotonic() - start < 10  # 1 s, then at most one short wait (SIGNAL_EVERY_S)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        ray.cancel(ref, force=True)
