"""Where ours' start-up goes: CPU seconds per process, from launch to the first scored image.

    .venv/bin/python benchmarks/startup_profile.py --input DIR --model CKPT [--runs 2] [--steady] [-- ARGS...]

Launches ``score-images run`` with the environment the throughput harness
gives it (ARGS are passed on; the default layout is the harness's CPU one),
reads its log for the milestones, samples ``/proc`` for its process tree
every 0.1 s, and at the first ``progress: first`` line prints the milestones
and each process's CPU time (user + system) so far, then stops the run. On a
2-core machine, CPU seconds over 2 is the shortest start-up possible. With
``--steady`` it lets the run finish instead and prints each process's CPU from
the first result to the end, per image scored after it: where the steady
state's CPU goes. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procmem  # noqa: E402 - sibling modules of this script, not a package
from throughput import OURS_PATTERNS, child_env  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_LAYOUT = ["--num-actors", "2", "--cpus-per-actor", "1", "--decode-cpus", "0"]


def _label(pid: int, comm: str) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return comm
    if "uvicorn" in cmdline:
        return "Prefect's temporary server"
    if "score-images" in cmdline:
        return "the command (driver)"
    return comm if comm.startswith("ray::") else (cmdline.split("/")[-1][:40] or comm)


def profile_once(args: list[str], workdir: Path, steady: bool = False
                 ) -> tuple[dict[str, float], dict[int, tuple[str, float]], float]:
    """(milestones in s, {pid: (label, CPU s)}, seconds to the first result) of one launch.

    ``steady``: CPU s from the first result to the command's exit instead, and
    the seconds between them; milestones gain ``images_after_first``.
    """
    cmd = [str(Path(sys.executable).parent / "score-images"), "run", "--output", str(workdir / f"out-{time.time_ns()}"),
           *args]
    env = child_env({"PREFECT_HOME": str(workdir / "prefect-home")})
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    marks: dict[str, float] = {}
    first = threading.Event()
    threading.Thread(target=_read_marks, args=(proc, t0, marks, first, steady), daemon=True).start()
    seen: dict[int, tuple[str, float]] = {}  # pid -> (comm, CPU s)

    def sample(until) -> float:
        while not until() and proc.poll() is None:
            for pid, (_, comm, ticks) in procmem.descendants(proc.pid).items():
                seen[pid] = (comm, ticks / TICK)
            time.sleep(0.1)
        return time.monotonic() - t0

    try:
        elapsed = sample(first.is_set)
        # labelled now: a Ray worker takes its title (ray::ScoringActor) only once it runs
        cpu = {pid: (_label(pid, comm), c) for pid, (comm, c) in seen.items()}
        if steady and first.is_set():  # the rest of the run, less what each process had used by then
            elapsed = sample(lambda: False) - elapsed
            cpu = {pid: (cpu[pid][0] if pid in cpu else _label(pid, comm), c - cpu.get(pid, ("", 0.0))[1])
                   for pid, (comm, c) in seen.items()}
    finally:
        procmem._kill_group(proc)
    if "first" not in marks:
        raise RuntimeError(f"score-images exited ({proc.returncode}) before its first result")
    return marks, cpu, elapsed


def _read_marks(proc: subprocess.Popen, t0: float, marks: dict[str, float], first: threading.Event,
                steady: bool) -> None:
    """Fill ``marks`` with the seconds at which ours' log showed each milestone; set ``first`` at its first result."""
    patterns = {k: re.compile(v) for k, v in OURS_PATTERNS.items() if k != "progress"}
    for line in proc.stdout:
        for name, pat in patterns.items():
            if name not in marks and pat.search(line):
                marks[name] = round(time.monotonic() - t0, 1)
        if "first" in marks and not first.is_set():
            marks["images_after_first"] = -int(re.search(patterns["first"], line).group(1))
            first.set()
        if steady and (m := re.search(r"progress: (\d+)/\d+ images \(100%\)", line)):
            marks["images_after_first"] += int(m.group(1))


def main() -> None:
    """Run ours ``--runs`` times with every process's CPU sampled; print the milestones and CPU by process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steady", action="store_true",
                        help="CPU per process from the first result to the end, per image, instead of start-up")
    # the harness's workdir: its Prefect database exists, which a first launch would create (10 s more)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deit-throughput")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then more score-images run options")
    a = parser.parse_args()
    extra = [x for x in a.rest if x != "--"] or DEFAULT_LAYOUT
    a.workdir.mkdir(parents=True, exist_ok=True)
    for run in range(1, a.runs + 1):
        marks, cpu, elapsed = profile_once(["--input", a.input, "--model", a.model, *extra], a.workdir,
                                           a.steady)
        total = sum(c for _, c in cpu.values())
        n = marks.pop("images_after_first", 0)
        what = f"{n} images after the first result in {elapsed:.1f} s" if a.steady else \
            f"first result at {elapsed:.1f} s"
        print(f"\nrun {run}: {what}; {total:.1f} CPU s in all ({total / elapsed:.2f} cores on average)")
        print("milestones: " + ", ".join(f"{k} {v}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])))
        print("| process | CPU s | CPU ms per image |\n|---|---:|---:|" if a.steady else "| process | CPU s |\n|---|---:|")
        for label, c in sorted(cpu.values(), key=lambda lc: -lc[1]):
            if c >= 0.05:
                print(f"| {label} | {c:.1f} |" + (f" {1000 * c / max(n, 1):.2f} |" if a.steady else ""))
        time.sleep(5)  # let the stopped run's processes go before the next launch


if __name__ == "__main__":
    main()
