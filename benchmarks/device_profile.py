"""What the scoring actors' device timelines show: how busy the GPU was, and with what.

Reads the files that ``DEIT_PROFILE_DIR`` makes each scoring actor write
(``deit_model/profiling.py``: a Chrome trace of a few seconds, and a note of the
window's length and the images scored in it) and prints, per actor: the
fraction of the window in which some kernel or copy ran on the device, the
kernels that took the most device time, the copies, and the CUDA runtime calls
that took the most host time (a long ``cudaStreamSynchronize`` is a thread
waiting for the device). A GPU that is busy nearly all the time bounds the run;
one that idles while the actor's threads are busy says the host side does
(docs/benchmarks.md). ``benchmarks/device_run.sh`` sets the variable for every
step; run this on the logs it brings back:

    python3 benchmarks/device_profile.py /tmp/logs/device-profile-deit-base-device-decode
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time in which at least one ran."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(note_path: str | Path, top: int = 12) -> dict:
    """One actor's window: its note's figures with the device's busy time and largest items added."""
    note_path = Path(note_path)
    note = json.loads(note_path.read_text())
    trace = json.loads((note_path.parent / note["trace"]).read_text())
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    wall = note["wall_s"]
    busy = busy_seconds((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in device)
    return {**note, "img_per_s": note["images"] / wall if wall else 0.0,
            "device_busy_fraction": busy / wall if wall else 0.0,
            "device_seconds": sum(e["dur"] for e in device) / 1e6,
            "kernels": _largest([e for e in device if e["cat"] == "kernel"], top),
            "copies": _largest([e for e in device if e["cat"] != "kernel"], top),
            "runtime": _largest([e for e in events if e.get("cat") in RUNTIME_CATEGORIES], top)}


def _largest(events: list[dict], top: int) -> list[dict]:
    """The ``top`` names by total duration: name, count, seconds."""
    totals: dict[str, list] = {}
    for e in events:
        entry = totals.setdefault(e.get("name", "?"), [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"] / 1e6
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"name": name[:120], "count": count, "seconds": round(sec, 6)} for name, (count, sec) in ranked]


def notes(paths: Iterable[str]) -> list[Path]:
    """The actors' notes under ``paths`` (folders or files), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        found += sorted(p.rglob("device-profile-*.json")) if p.is_dir() else [p]
    return [f for f in found if not f.name.endswith(".trace.json")]


def report(summary: dict) -> str:
    """A summary as a few lines of text."""
    lines = [f"{summary['images']} images in {summary['wall_s']:.2f} s ({summary['img_per_s']:.0f} img/s) "
             f"on {summary['device']}: device busy {100 * summary['device_busy_fraction']:.1f} % "
             f"({summary['device_seconds']:.3f} s of device work)"]
    for key in ("kernels", "copies", "runtime"):
        for item in summary[key]:
            lines.append(f"  {key:8} {item['seconds']:9.4f} s {item['count']:7d} x {item['name']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print each actor's summary (and write them all as JSON to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="folders that DEIT_PROFILE_DIR named, or notes in them")
    parser.add_argument("--top", type=int, default=12, help="largest kernels, copies and runtime calls to list")
    parser.add_argument("--out", help="write the summaries here as JSON")
    args = parser.parse_args(argv)
    found = notes(args.paths)
    if not found:
        parser.error(f"no device-profile-*.json under {' '.join(args.paths)}; was DEIT_PROFILE_DIR set for the run?")
    summaries = {str(n): summarize(n, args.top) for n in found}
    for name, summary in summaries.items():
        print(f"{name}\n{report(summary)}")
    if args.out:
        Path(args.out).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
