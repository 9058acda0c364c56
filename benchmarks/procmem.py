"""Measuring a benchmark stage from outside: its process tree's memory and CPU, its output, the machine.

A benchmark stage is one command that may start many processes: Prefect's
ephemeral API server, Ray's GCS, raylet, dashboard agents and workers (all
started by the driver, so all its descendants), a DataLoader's workers. Their
memory counts, so :class:`PeakMemory` samples the whole tree every
``interval`` seconds from a background thread and keeps the largest sum.

RSS summed over processes counts shared pages once per process that maps them
(Ray's object store in /dev/shm, torch's libraries), so it overstates what the
machine needs; PSS splits shared pages between their users and sums to the
real footprint. Both are reported; PSS is read less often because
``smaps_rollup`` costs more than ``statm``. The sampler also keeps each
process's CPU time, so that CPU used on the machine by anything else while
the stage ran (other work on a shared machine) can be reported beside it.

:func:`run_measured` runs one command under the sampler and timestamps its
output lines as they arrive, which is how a stage's start-up and steady state
are read from outside it; :func:`busy_cores` and :func:`hardware` describe the
machine the figures come from. Reads ``/proc`` directly (Linux only), so it
needs no third-party package. A process that was seen once stays counted while it lives even if it is
reparented (a daemonising child), as long as its start time shows the pid was
not reused.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, start time, comm, CPU time used) of ``pid``, times in clock ticks; None if it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces or ')': split at the last ')'
    head, _, rest = raw.rpartition(")")
    fields = rest.split()
    return int(fields[1]), int(fields[19]), head.partition("(")[2], int(fields[11]) + int(fields[12])


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 if it has gone or is unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)  # idle and iowait are not busy


def busy_cores(window: float = 2.0) -> float:
    """Cores kept busy by anything on the machine over the next ``window`` s."""
    busy0, total0 = machine_ticks()
    time.sleep(window)
    busy1, total1 = machine_ticks()
    return round((os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1), 2)


def descendants(root: int) -> dict[int, tuple[int, str, int]]:
    """``{pid: (start ticks, comm, CPU ticks)}`` for ``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, str, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append(int(name))
            info[int(name)] = st[1:]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info and pid not in tree:
            tree[pid] = info[pid]
            todo.extend(children.get(pid, ()))
    return tree


@dataclass
class MemoryPeak:
    """The largest sums seen, which processes made up the RSS peak, and CPU use."""

    rss_bytes: int = 0
    pss_bytes: int = 0
    processes: int = 0  # most processes alive in the tree at once
    samples: int = 0
    at_peak: list[tuple[str, int]] = field(default_factory=list)  # (comm, rss) at the RSS peak, largest first
    tree_cpu_s: float = 0.0  # CPU time of the tree's processes (as last sampled)
    other_cores: float = 0.0  # mean cores kept busy meanwhile by processes outside the tree
    sampler_cores: float = 0.0  # mean cores the sampler's own thread used (part of other_cores)

    def as_dict(self) -> dict:
        return {"peak_rss_mib": round(self.rss_bytes / 2**20, 1), "peak_pss_mib": round(self.pss_bytes / 2**20, 1),
                "peak_processes": self.processes, "samples": self.samples,
                "at_peak": [(name, round(rss / 2**20, 1)) for name, rss in self.at_peak[:8]],
                "tree_cpu_s": round(self.tree_cpu_s, 1), "other_cores": round(self.other_cores, 2),
                "sampler_cores": self.sampler_cores}


class PeakMemory:
    """Sample a process tree's summed RSS every ``interval`` s in a thread; see module doc.

    Use as a context manager around the child's lifetime, or ``start()``/``stop()``.

    A sample's CPU is taken from the stage it measures, so the costly reads run on
    slower clocks: the scan of all /proc for new descendants every ``scan_seconds``,
    PSS (``smaps_rollup`` walks the page tables: 12 ms for a 560 MB process) every
    ``pss_seconds`` and, at most every second, when the RSS sum has grown 2 %; in
    between only the known processes' ``stat`` and ``statm``. Reading all of it every
    sample took 0.066 cores of 2 during ours' run (2026-12-03 17:20 UTC), 0.020 now
    (``sampler_cores``).
    """

    def __init__(self, pid: int, interval: float = 0.2, pss_seconds: float = 5.0, scan_seconds: float = 1.0):
        self.pid, self.interval = pid, interval
        self.pss_seconds, self.scan_seconds = pss_seconds, scan_seconds
        self.peak = MemoryPeak()
        self._seen: dict[int, tuple[int, str, int]] = {}
        self._cpu: dict[tuple[int, int], int] = {}  # (pid, start) -> CPU ticks last seen
        self._machine0 = machine_ticks()
        self._last_scan = self._last_pss = -float("inf")
        self._pss_at_rss = 0  # the RSS sum when PSS was last read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peak-memory-{pid}", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> MemoryPeak:
        """Stop sampling (after one last sample) and return the peak."""
        self._stop.set()
        self._thread.join()
        busy, total = (b - a for a, b in zip(self._machine0, machine_ticks()))
        tick = os.sysconf("SC_CLK_TCK")
        self.peak.tree_cpu_s = sum(self._cpu.values()) / tick
        if total > 0:  # total counts every CPU's ticks: busy share times cores, less the tree's own
            cores = os.cpu_count() or 1
            self.peak.other_cores = max(0.0, cores * (busy - sum(self._cpu.values())) / total)
        return self.peak

    def _run(self) -> None:
        cpu0 = time.thread_time()
        while True:
            self.sample(with_pss=None)
            if self._stop.wait(self.interval):
                break
        self.sample(with_pss=True)  # the last one in full, whatever the clocks say
        self.peak.sampler_cores = round((time.thread_time() - cpu0) / max(time.monotonic() - self._started, 1e-9), 4)

    def sample(self, with_pss: bool | None = True) -> int:
        """Take one sample now; returns the summed RSS in bytes.

        ``with_pss`` None: read PSS only when its clock (or the RSS growth) says so.
        """
        now = time.monotonic()
        live = self._live(full=with_pss is not None or now - self._last_scan >= self.scan_seconds, now=now)
        for pid, (start, _, cpu) in live.items():
            self._cpu[pid, start] = max(cpu, self._cpu.get((pid, start), 0))
        rss = {pid: rss_bytes(pid) for pid in live}
        total = sum(rss.values())
        peak = self.peak
        peak.samples += 1
        peak.processes = max(peak.processes, len(live))
        if total > peak.rss_bytes:
            peak.rss_bytes = total
            peak.at_peak = sorted(((live[p][1], r) for p, r in rss.items()), key=lambda x: -x[1])
        if with_pss is None:
            since = now - self._last_pss
            with_pss = since >= self.pss_seconds or (since >= 1.0 and total > 1.02 * self._pss_at_rss)
        if with_pss:
            self._last_pss, self._pss_at_rss = now, total
            peak.pss_bytes = max(peak.pss_bytes, sum(pss_bytes(pid) for pid in live))
        return total

    def _live(self, full: bool, now: float) -> dict[int, tuple[int, str, int]]:
        """The tree's live processes: a scan of /proc when ``full``, else those seen before that still run."""
        live = descendants(self.pid) if full else {}
        if full:
            self._last_scan = now
        for pid, (start, _, _) in self._seen.items():
            # reparented (daemonised) processes stay counted while the same process lives
            st = _stat(pid) if pid not in live else None
            if st is not None and st[1] == start:
                live[pid] = st[1:]
        self._seen = live
        return live


@dataclass
class ChildRun:
    """What :func:`run_measured` saw: exit code, epoch times, matched lines, events, memory."""

    returncode: int
    launched: float  # time.time() just before the command started
    ended: float  # time.time() when it had exited
    matches: dict[str, list[tuple[float, tuple]]]  # pattern name -> [(time.time() seen, groups)]
    events: list[dict]  # 'BENCH {json}' lines, each with 'received' (time.time())
    tail: list[str]  # the last lines of output, for error messages
    memory: MemoryPeak

    def first(self, name: str) -> tuple[float, tuple] | None:
        return self.matches[name][0] if self.matches.get(name) else None

    def last(self, name: str) -> tuple[float, tuple] | None:
        return self.matches[name][-1] if self.matches.get(name) else None


def run_measured(cmd: list[str], env: dict, patterns: dict[str, str] | None = None, log_path: Path | None = None,
                 timeout: float | None = None) -> ChildRun:
    """Run ``cmd`` (stdout and stderr merged), timestamp its lines and sample its tree's memory.

    The command gets its own session, so on timeout or Ctrl-C its whole process
    group (Ray's processes included) is terminated, never anything else.
    """
    compiled = {k: re.compile(v) for k, v in (patterns or {}).items()}
    matches: dict[str, list] = {k: [] for k in compiled}
    events, tail = [], deque(maxlen=40)
    # line-buffered: device_probe.sh (and anyone tailing it) reads the log while the stage runs
    log = open(log_path, "w", buffering=1) if log_path else None
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            bufsize=1, errors="replace", start_new_session=True)
    timer = threading.Timer(timeout, _kill_group, (proc,)) if timeout else None
    if timer:
        timer.start()
    try:
        with PeakMemory(proc.pid) as mem:
            for line in proc.stdout:
                now = time.time()
                tail.append(line.rstrip())
                if log:
                    log.write(line)
                for name, pat in compiled.items():
                    m = pat.search(line)
                    if m:
                        matches[name].append((now, m.groups()))
                if line.startswith("BENCH "):
                    events.append(dict(json.loads(line[6:]), received=now))
            rc = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if timer:
            timer.cancel()
        if log:
            log.close()
    return ChildRun(rc, launched, time.time(), matches, events, list(tail), mem.peak)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group this module started for ``proc``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue

