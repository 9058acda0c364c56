"""Listing and planning at scale: time and peak memory for N objects.

Creates N empty ``.jpg`` files (1,000 per directory) on local disk, then, in a
fresh process per measurement, runs the real planning step (``plan_run``:
list -> filter -> incremental anti-join -> plan file) twice:

* ``first``: an empty output, so every object is new;
* ``nightly``: an output whose committed history already holds all N objects
  (a predictions file with their versions and a committed manifest), so the
  anti-join against the scored index runs at full size and plans nothing.

Peak RSS is the process's ``ru_maxrss``; the per-object cost is the slope
between the two largest N. Run: ``.venv/bin/python benchmarks/listing.py
--counts 100000 1000000 --out docs/listing.md`` (1M files take ~2 minutes to
create and ~1 GB of inodes' worth of directory entries on disk).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_DIR = 1000


def make_tree(root: Path, n: int) -> None:
    """N empty .jpg files, PER_DIR per directory (reused if already there)."""
    marker = root / f".made-{n}"
    if marker.exists():
        return
    for d in range(0, n, PER_DIR):
        sub = root / f"d{d // PER_DIR:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(d, min(d + PER_DIR, n)):
            (sub / f"img{i:08d}.jpg").touch()
    marker.touch()


def fake_history(output: Path, images: Path, model: str) -> None:
    """A committed run that scored every image under ``images`` (versions from the disk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tasks.enumerate import list_images, plan_table
    from tasks.plan import RunInfo
    from tasks.report import RunSummary, write_manifest

    table = plan_table(list(list_images(str(images))))
    part = output / "predictions" / "model_slug=m" / "run_date=2026-01-01" / "part-old.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.append_column("model_revision", pa.array(["r"] * table.num_rows)), part)
    summary = RunSummary("old", "committed", model, str(images), str(output), files=[f"file://{part}"],
                         committed_at="2026-01-01T00:00:00+00:00")
    write_manifest(summary, RunInfo("old", "2026-01-01", "2026-01-01T00:00:00+00:00", str(output)))


def measure(images: Path, output: Path) -> dict:
    """Run plan_run in this process; returns seconds, peak RSS and counts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tasks.plan import new_run, plan_run
    from tasks.settings import ScoreSettings

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    settings = ScoreSettings(input=str(images), output=str(output))
    start = time.perf_counter()
    counts = plan_run(settings, new_run(settings), "m", "r")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / 1024, 1),
            "rss_before_mib": round(base / 1024, 1), "listed": counts.listed, "to_score": counts.to_score}


def run_child(images: Path, output: Path) -> dict:
    """:func:`measure` in a fresh interpreter (its own peak memory), as a dict."""
    code = (f"import json,sys; sys.path.insert(0,{str(Path(__file__).parent)!r}); import listing; "
            f"print(json.dumps(listing.measure(__import__('pathlib').Path({str(images)!r}), "
            f"__import__('pathlib').Path({str(output)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Make a tree of each ``--counts`` size; measure a first run's and a nightly run's listing and planning."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--root", default=None, help="where to create the trees (default: a temp dir)")
    parser.add_argument("--out", help="markdown file for the results table")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="listing-bench-"))
    rows = []
    for n in args.counts:
        images = root / f"tree-{n}"
        t0 = time.perf_counter()
        make_tree(images, n)
        made = time.perf_counter() - t0
        first = run_child(images, root / f"out-first-{n}-{time.time_ns()}")
        hist = root / f"out-nightly-{n}-{time.time_ns()}"
        fake_history(hist, images, "m")
        nightly = run_child(images, hist)
        rows.append({"n": n, "create_s": round(made, 1), "first": first, "nightly": nightly})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}", "",
             "| objects | first run: s | peak RSS MiB | nightly (all scored): s | peak RSS MiB | planned |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['first']['seconds']} | {r['first']['peak_rss_mib']} | "
                     f"{r['nightly']['seconds']} | {r['nightly']['peak_rss_mib']} | {r['nightly']['to_score']} |")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        for phase in ("first", "nightly"):
            slope = (b[phase]["peak_rss_mib"] - a[phase]["peak_rss_mib"]) * 2**20 / (b["n"] - a["n"])
            lines.append(f"\nPer-object memory ({phase}): {slope:.0f} bytes "
                         f"(slope of peak RSS between {a['n']:,} and {b['n']:,} objects)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
