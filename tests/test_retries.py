"""Prefect retries: transient storage failures are retried with backoff, everything else fails at once."""
from __future__ import annotations

import errno
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks.storage import is_transient


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as exc:  # noqa: BLE001
        return exc


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (_client_error("SlowDown", 503), True),
    (_client_error("InternalError", 500), True),
    (_chained(OSError("s3://b/k: failed"), _client_error("ServiceUnavailable", 503)), True),
    (_chained(RuntimeError("listing failed"), ConnectionAbortedError()), True),
    (FileNotFoundError(errno.ENOENT, "no such object", "s3://b/k"), False),
    (PermissionError(errno.EACCES, "access denied", "s3://b/k"), False),
    (_client_error("NoSuchBucket", 404), False),
    (_client_error("AccessDenied", 403), False),
    (_chained(FileNotFoundError("gone"), ConnectionResetError()), False),  # the outer verdict wins
    (ValueError("bad manifest"), False),
    (OSError("disk full"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


class _Flaky:
    """Wraps a function: raises ``error`` for the first ``failures`` calls, then calls through."""

    def __init__(self, fn, error: BaseException, failures: int):
        self.fn, self.error, self.failures, self.calls = fn, error, failures, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.fn(*args, **kwargs)


@pytest.fixture
def no_backoff(monkeypatch):
    """The flow's tasks without the backoff delay, so a retry costs no test time (their retries are kept)."""
    import flows.score_images as module

    for name in ("plan_task", "score_task", "commit_task"):
        monkeypatch.setattr(module, name, getattr(module, name).with_options(retry_delay_seconds=0,
                                                                             retry_jitter_factor=None))
    return module


_RESET = ConnectionResetError(errno.ECONNRESET, "connection reset by peer")


def test_every_step_retries_three_times_with_backoff():
    """plan, score and commit each retry a transient failure 3 times, after 10, 20 and 40 s, jittered."""
    import flows.score_images as module

    for step in (module.plan_task, module.score_task, module.commit_task):
        assert step.retries == 3, step.name
        assert list(step.retry_delay_seconds) == [10, 20, 40], step.name
        assert step.retry_jitter_factor == 0.5, step.name
        assert step.retry_condition_fn is module.retry_transient, step.name


@pytest.mark.slow
def test_transient_failure_is_retried_and_the_run_commits(ray_cluster, prefect_harness, no_backoff, monkeypatch,
                                                          tiny_checkpoint, photos, tmp_path):
    """Each step fails 3 times (all its retries) and then succeeds: 4 calls each, and the run commits."""
    flaky = {name: _Flaky(getattr(no_backoff, name), _RESET, 3) for name in ("plan_run", "score_run", "commit")}
    for name, fn in flaky.items():
        monkeypatch.setattr(no_backoff, name, fn)
    state = no_backoff.score_images(input=str(photos), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                                    return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message  # no image failed
    summary = state.result()
    assert {name: fn.calls for name, fn in flaky.items()} == {"plan_run": 4, "score_run": 4, "commit": 4}
    assert summary.status == "committed" and summary.scored == 8


@pytest.mark.parametrize("step", ["plan_run", "score_run"])
def test_a_transient_failure_that_outlasts_the_retries_fails_the_run(prefect_harness, no_backoff, monkeypatch,
                                                                     tiny_checkpoint, photos, tmp_path, step):
    """4 failures in a row are one more than the 3 retries: the step is called 4 times and the run fails."""
    flaky = _Flaky(getattr(no_backoff, step), _RESET, 4)
    monkeypatch.setattr(no_backoff, step, flaky)
    state = no_backoff.score_images(input=str(photos), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                                    return_state=True)
    assert state.is_failed() and "connection reset by peer" in state.message, state.message
    assert flaky.calls == 4
    (manifest,) = (tmp_path / "out" / "_runs").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["status"] == "failed"


def test_permanent_failure_is_not_retried(prefect_harness, no_backoff, monkeypatch, tiny_checkpoint, photos,
                                          tmp_path):
    flaky = _Flaky(no_backoff.plan_run, PermissionError(errno.EACCES, "access denied", "s3://b/k"), 10)
    monkeypatch.setattr(no_backoff, "plan_run", flaky)
    state = no_backoff.score_images(input=str(photos), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                                    return_state=True)
    assert state.is_failed() and "access denied" in state.message
    assert flaky.calls == 1
