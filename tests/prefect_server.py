"""A real Prefect server (SQLite, 127.0.0.1, analytics off) and process workers, for tests.

Everything runs as separate processes through the ``prefect`` command line,
as an operator would run it; the tests talk to the server with its HTTP client.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PREFECT = str(Path(sys.executable).with_name("prefect"))
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """``prefect server start`` in its own home and database; ``env`` points clients at it."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env = {
            **base,
            "PREFECT_HOME": str(root / "home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # a run held back by a deployment's concurrency limit is retried after this long
            # (30 s by default, nothing to a nightly job, most of a test's time)
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 120) -> "PrefectServer":
        """Start the server and wait until its health endpoint answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], "server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log('server')[-2000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout}s: {self.log('server')[-2000:]}")

    def cli(self, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server from the repository root."""
        return subprocess.run([PREFECT, *args], cwd=REPO, env={**self.env, **(env or {})}, text=True,
                              capture_output=True, timeout=timeout)

    def start_worker(self, pool: str, env: dict | None = None) -> subprocess.Popen:
        """A process worker polling ``pool`` every second; its flow runs inherit ``env`` too."""
        return self._spawn([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], "worker", env)

    def _spawn(self, cmd: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        # a new session, so stop() can end the process with all its children
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Terminate workers and server (and their process groups)."""
        import signal

        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
