"""The throughput benchmark's process plumbing: how each stage's process is started, and what the run records.

Split from throughput.py, which measures the stages; this starts them the
same way each time (environment, logs, checkpoints, Prefect's database) and
reads back what they left (rows written, the commit measured).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import procmem

logger = logging.getLogger("throughput")

ROOT = Path(__file__).resolve().parents[1]


def child_env(extra: dict | None = None) -> dict:
    """The environment every stage gets: the same for all, offline, unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               **(extra or {}))
    # Ray sets OMP_NUM_THREADS per actor from its CPUs only when it is unset
    env.pop("OMP_NUM_THREADS", None)
    return env


def run_child(name: str, args: dict, log: Path, timeout: float | None = None,
              env: dict | None = None) -> procmem.ChildRun:
    """Run stage child ``name`` in a fresh interpreter; raise if it fails."""
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("stages.py")), name, json.dumps(args)]
    run = procmem.run_measured(cmd, env or child_env(), log_path=log, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"stage {name} failed (exit {run.returncode}); see {log}:\n  "
                           + "\n  ".join(run.tail[-8:]))
    return run


def resolve_model(name: str, workdir: Path) -> Path:
    """A checkpoint directory for ``name``: itself if it is one, else a random-weight copy (reused)."""
    if Path(name).is_dir():
        return Path(name).resolve()
    target = workdir / "checkpoints" / ("random-" + name.replace("/", "--").replace(":", "-"))
    if not (target / "config.json").exists():
        logger.info("making a random-weight checkpoint of %s in %s", name, target)
        run_child("checkpoint", {"model": name, "dir": str(target)}, workdir / "logs" / "checkpoint.log")
    return target


def ours_command() -> list[str]:
    """The ``score-images`` command beside this interpreter, or the same entry point run as a module.

    The second is for an interpreter with the project on ``PYTHONPATH`` rather
    than installed (the lent GPU machine, docs/benchmarks.md).
    """
    script = Path(sys.executable).parent / "score-images"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def prefect_database(env: dict) -> None:
    """Create Prefect's database under ``PREFECT_HOME`` once, so no measured start-up includes it.

    A user's machine has one from its first flow run on; a fresh workdir (the
    lent GPU machine) would add about 7 s to the first start-up only.
    """
    if (Path(env["PREFECT_HOME"]) / "prefect.db").exists():
        return
    t0 = time.monotonic()
    code = "from prefect import flow\nflow(name='warm-up')(lambda: None)()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    logger.info("Prefect's database created in %.1f s (exit %d)", time.monotonic() - t0, done.returncode)


def count_rows(path: Path) -> int:
    """Rows of the Parquet dataset under ``path`` (hive-partitioned), 0 if there is none."""
    import pyarrow.dataset as pds

    if not path.exists():
        return 0
    return pds.dataset(str(path), format="parquet", partitioning="hive").count_rows()


def git_commit() -> str:
    """``BENCH_COMMIT`` where set, else HEAD (and whether the tree differs from it).

    device_run.sh sets ``BENCH_COMMIT`` from the commit device_bundle.sh recorded: the
    device's copy of the tree need not carry this repository's history (on 2026-12-04 its
    .git named the commit before the one that ran, with "uncommitted changes").
    """
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        head = None
    if head is None or head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def hardware() -> dict:
    """CPU model, cores, memory, GPU and library versions of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    versions = {}
    for pkg in ("torch", "transformers", "ray", "timm", "prefect", "pillow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "gpu": gpu or "none",
            "python": platform.python_version(), "versions": versions}
