"""Beyond one machine: a Ray cluster of a head and a worker node, each started by `ray start`
as its own process, and the `score-images` command joining it through RAY_ADDRESS.

The head offers 1 CPU and the worker node 2, and each scoring actor asks for 2,
so scoring can only happen on the worker node; the cluster's actor table then
shows where the run's actors actually ran. The worker node joins only once the
run has said it is waiting for resources, as an autoscaled GPU node would.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.prefect_server import REPO, _free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

_INSPECT = """
import json, sys, ray, ray._private.state as state
ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = {n["NodeID"]: "node:__internal_head__" in n["Resources"] for n in ray.nodes() if n["Alive"]}
actors = [{"cls": a.get("ActorClassName", ""), "node": a.get("Address", {}).get("NodeID", "")}
          for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _inspect(address: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _INSPECT, address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def two_node_cluster(session_tmp):
    """A head (1 CPU) and a worker node (2 CPUs): two `ray start --block` processes."""
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's unix sockets live under it
    address, client_port = f"127.0.0.1:{_free_port()}", _free_port()
    common = ["--disable-usage-stats", "--object-store-memory=200000000", "--block"]
    logs = session_tmp / "ray-multinode"
    logs.mkdir(exist_ok=True)
    procs = []
    # killpg's SIGTERM reaches the head's GCS too, so the head's drain of itself can only time
    # out (30 s by default); the test's nodes have nothing to drain
    node_env = {**_ray_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

    def start(name: str, args: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *common], env=node_env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def add_worker_node() -> None:
        start("worker", [f"--address={address}", "--num-cpus=2"])
        _wait_for_nodes(address, 2, procs)

    try:
        start("head", ["--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=1",
                       f"--ray-client-server-port={client_port}", f"--temp-dir={temp}", "--include-dashboard=false"])
        _wait_for_nodes(address, 1, procs)
        yield address, f"ray://127.0.0.1:{client_port}", add_worker_node
    finally:
        for proc in reversed(procs):  # SIGTERM makes `ray start --block` stop the node it started
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, procs: list, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a `ray start` process exited"
        try:
            if len(_inspect(address)["nodes"]) >= n:
                return
        except (AssertionError, ValueError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray cluster at {address} did not reach {n} nodes")


def test_flow_joins_a_cluster_by_address_and_scores_on_the_worker_node(two_node_cluster, image_dir,
                                                                      tiny_checkpoint, session_tmp):
    address, client_address, add_worker_node = two_node_cluster
    out = session_tmp / "multinode-out"
    # through Ray Client, as the Kubernetes work pool's runs join (infra/k8s): the driver has no
    # GCS client of its own, so the autoscaler request must run inside the cluster
    env = {**_ray_env(), "RAY_ADDRESS": client_address}
    proc = subprocess.Popen(
        [str(BIN / "score-images"), "run", "--input", str(image_dir), "--output", str(out),
         "--model", str(tiny_checkpoint), "--cpus-per-actor", "2", "--decode-cpus", "1",
         "--resource-wait-seconds", "300"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("waiting up to" in line for line in lines):  # the head alone cannot hold the actor
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
        time.sleep(0.5)
    add_worker_node()
    assert proc.wait(timeout=600) == 0, "".join(lines)[-4000:]
    reader.join(timeout=10)
    log = "".join(lines)
    assert f"ray: connected to {client_address}" in log

    assert ds.dataset(out / "predictions", format="parquet").count_rows() == 14
    assert ds.dataset(out / "errors", format="parquet").count_rows() == 3

    cluster = _inspect(address)
    assert len(cluster["nodes"]) == 2  # the run joined this cluster; it started none of its own
    worker_nodes = {node for node, is_head in cluster["nodes"].items() if not is_head}
    scorers = [a for a in cluster["actors"] if "ScoringActor" in a["cls"]]
    assert scorers, cluster["actors"]  # the run's actors are in this cluster's table
    assert all(a["node"] in worker_nodes for a in scorers), cluster


_STATES = """
import sys, ray
from tasks.actor_watch import actor_states
ray.init(address=sys.argv[1], logging_level="ERROR")
actor = ray.remote(num_cpus=0)(type("Idle", (), {"ping": lambda self: 1})).remote()
ray.get(actor.ping.remote())
print(actor_states([actor]))
"""


def test_the_actor_watch_reads_states_through_ray_client(two_node_cluster):
    """A driver joined by ray:// has no control-store client: the watch asks from inside the
    cluster (it once read nothing there, and a run waiting on a lost node waited for ever)."""
    _, client_address, _ = two_node_cluster
    out = subprocess.run([sys.executable, "-c", _STATES, client_address], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=_ray_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[('ALIVE', 0)]", out.stdout
