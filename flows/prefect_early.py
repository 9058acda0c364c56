"""Start Prefect's temporary API server early, while the command line is still checking.

Without ``PREFECT_API_URL`` a flow run starts a temporary server in a
subprocess on first use (5 to 6 s on a 2-core machine), after everything
before it. Started here on a thread instead, it boots on the other core while
the command line imports the model libraries.
"""
from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import types
from typing import Callable

logger = logging.getLogger(__name__)


def start_temporary_server() -> Callable[[], None]:
    """Begin starting the server a flow run would start; returns a function that waits for it.

    Does nothing when an API is configured (production, the test harness) or
    temporary servers are off. A failed early start is only logged: the flow
    run then starts the server itself and reports the error as Prefect does.
    Call the returned function before the flow runs: until the server answers,
    Prefect would hand the flow a URL nobody listens on yet.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None

    ready = threading.Event()

    def work() -> None:
        try:
            from prefect.server.api import server

            _own_session(server)
            server.SubprocessASGIServer().start()  # the same instance the flow run's client uses
        except Exception:  # noqa: BLE001 - the flow run retries and reports
            logger.debug("early start of Prefect's temporary server failed", exc_info=True)
        finally:
            ready.set()
        # the server's parent-death signal follows the thread that started it (prctl): this
        # thread lives as long as the process, so the server dies with it, SIGKILL included
        threading.Event().wait()

    threading.Thread(target=work, name="prefect-early-start", daemon=True).start()
    return ready.wait


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends (Linux)."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _prctl():
    """libc's prctl, looked up here, not in the forked child; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1
_PRCTL = _prctl()


class _OwnSessionPopen(subprocess.Popen):
    """Popen in a new session, and (Linux) ended by the kernel when the command dies."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        if _PRCTL is not None:
            kwargs.setdefault("preexec_fn", _die_with_parent)
        super().__init__(*args, **kwargs)


def _own_session(server_module) -> None:
    """Start Prefect's temporary server, the only process its server module starts, in its own session.

    Why: in the terminal's process group, Ctrl-C killed the server along with the
    command, and the flow engine then retried reporting the interrupted run to it for
    about 140 s before giving up with a connection traceback. In its own session it
    lives until the command stops it at exit (Prefect's atexit hook), so the run is
    marked crashed at once. Only that module's name ``subprocess`` is replaced. Out of
    the command's process group, a ``kill -9`` of the group would leave the server
    running: on Linux the kernel ends it when the command dies (``PR_SET_PDEATHSIG``), and
    SIGTERM and SIGHUP are turned into Ctrl-C (cli) so that the atexit hook runs.
    """
    if not isinstance(server_module.subprocess, types.SimpleNamespace):
        server_module.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": _OwnSessionPopen})
