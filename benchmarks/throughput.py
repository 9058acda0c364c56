"""Throughput of the scoring pipeline against its ceiling, a naive baseline and a peer.

One command measures, on the same machine and the same generated images, each
stage in its own fresh process (so memory and start-up are isolated):

* ``ceiling``: the model's forward pass on a random batch already on the
  device (the Scorer's own model), per dtype, batch size and thread count;
* ``ours``: ``score-images run`` end to end, storage -> decode -> model ->
  Parquet committed. Start-up is launch to the pipeline's ``progress: first``
  log line; steady state is the images after it over the time to the 100 %
  progress line; wall is the whole command (commit and shutdown included);
* ``baseline``: ``transformers.pipeline("image-classification")`` looping over
  the files with ``batch_size``, rows written to one Parquet file at the end;
* ``peer``: Ray Data's documented batch-inference recipe (``read_images`` ->
  ``map_batches`` preprocessing -> ``map_batches`` model class in an actor pool
  -> ``write_parquet``) with the same checkpoint, batch size, actors and CPUs.

Every stage's output rows are counted, so a broken run cannot report a
figure. Models are named as on the hub (``facebook/...`` or ``timm:...``) and
built here with random weights and the published configuration (no hub is
reachable), or given as a checkpoint directory. Method: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images  # noqa: E402 - sibling modules of this script, not a package
import options  # noqa: E402
import procmem  # noqa: E402
from harness import (child_env, count_rows, git_commit, hardware, ours_command, prefect_database,  # noqa: E402
                     resolve_model, run_child)
from report import format_report, write_out  # noqa: E402

logger = logging.getLogger("throughput")

OURS_PATTERNS = {  # log lines of score-images run (tasks/pipeline.py, tasks/ray_cluster.py, Prefect)
    "first": r"progress: first (\d+) images after ([\d.]+) s",
    "progress": r"progress: (\d+)/(\d+) images \(\d+%\), ([\d.]+) img/s",
    "flow_started": r"Beginning flow run",
    "planned": r"planned (\d+) images",
    "ray_connected": r"ray: connected",
    "actors_started": r"pool: starting",
    "scoring_started": r"scoring \d+ images in batches",
    # transformers' load bar, forwarded by Ray on a line of its own (the actor's name is on the line before)
    "weights_loaded": r"Loading weights: 100%",
}




# ---------------------------------------------------------------- parent: measuring stages

def measure_ceiling(cfg: argparse.Namespace, ckpt: Path, dtype: str, after: bool = False) -> list[dict]:
    """One row per (threads, batch size): forward-only images per second.

    On CPU also one row per batch size for one 1-thread process per core side
    by side (the data-parallel ceiling, which ours' single-threaded actors are
    closer to). ``after``: the repeat right after ours' first run, at its batch size only.
    """
    threads = [] if cfg.device == "cuda" else cfg.ceiling_threads
    args = {"ckpt": str(ckpt), "device": cfg.device, "dtype": dtype, "threads": threads,
            "batch_sizes": [cfg.batch_size] if after else cfg.batch_sizes, "seconds": cfg.ceiling_seconds}
    log = cfg.logs / f"ceiling-{ckpt.name}-{dtype}{'-after' * after}.log"
    run = run_child("ceiling", args, log, cfg.timeout)
    suffix = ", after" if after else ""
    rows = [dict(e, stage=(f"ceiling ({e['threads']} thread{'s' * (e['threads'] != 1)})"
                           if cfg.device == "cpu" else "ceiling") + suffix, after=after, memory=run.memory.as_dict())
            for e in run.events if e["event"] == "ceiling"]
    cores = os.cpu_count() or 1
    if cfg.device == "cpu" and cores > 1:
        rows += _parallel_ceiling(cfg, dict(args, threads=[1]), log, cores, suffix, after)
    return rows


def _parallel_ceiling(cfg, args: dict, log: Path, n: int, suffix: str, after: bool) -> list[dict]:
    """``n`` 1-thread ceiling processes at once: their rates summed per batch size."""
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda i: run_child("ceiling", args, log.with_suffix(f".parallel{i}.log"),
                                                 cfg.timeout), range(n)))
    mems = [r.memory.as_dict() for r in runs]
    # each process's "other work" is mostly its siblings: take their CPU out of it
    other = max(m["other_cores"] - sum(o["tree_cpu_s"] for o in mems if o is not m) / (r.ended - r.launched)
                for m, r in zip(mems, runs))
    memory = dict(mems[0], peak_rss_mib=sum(m["peak_rss_mib"] for m in mems),
                  peak_pss_mib=sum(m["peak_pss_mib"] for m in mems), other_cores=round(max(other, 0.0), 2),
                  sampler_cores=sum(m.get("sampler_cores", 0) for m in mems))
    events = [[e for e in r.events if e["event"] == "ceiling"] for r in runs]
    return [dict(es[0], stage=f"ceiling ({n} x 1-thread processes){suffix}", threads=f"{n} x 1", after=after,
                 rate=sum(e["rate"] for e in es), mean_rate=sum(e["mean_rate"] for e in es), memory=memory)
            for es in zip(*events)]


def measure_ours(cfg, ckpt: Path, dtype: str, source: str, n: int, storage_options: dict) -> dict:
    """``score-images run`` end to end, read from its log lines."""
    out = cfg.workdir / "outputs" / f"ours-{time.time_ns()}"
    cmd = ours_command() + ["run", "--input", source, "--output", str(out),
           "--model", str(ckpt), "--batch-size", str(cfg.batch_size), "--dtype", dtype, "--device", cfg.device,
           "--num-actors", str(cfg.num_actors), "--cpus-per-actor", str(cfg.cpus_per_actor),
           "--decode-cpus", str(cfg.decode_cpus), "--gpus-per-actor", str(cfg.gpus_per_actor)]
    # progress lines are ours' only timing points: dense enough for a settled window at GPU rates
    cmd += ["--progress-seconds", str(cfg.progress_seconds)]
    cmd += ["--fast-decode"] if cfg.fast_decode else []
    cmd += ["--storage-options", json.dumps(storage_options)] if storage_options else []
    cmd += shlex.split(cfg.ours_args)
    env = child_env({"PREFECT_HOME": str(cfg.workdir / "prefect-home")})
    prefect_database(env)
    run = procmem.run_measured(cmd, env, OURS_PATTERNS, cfg.logs / f"ours-{ckpt.name}-{dtype}-{n}.log", cfg.timeout)
    if run.returncode != 0 or not run.first("first"):
        raise RuntimeError(f"ours failed (exit {run.returncode}):\n  " + "\n  ".join(run.tail[-8:]))
    rows = count_rows(out / "predictions")
    t_first, (n_first, _) = run.first("first")
    points = [(t_first, int(n_first))] + [(t, int(g[0])) for t, g in run.matches["progress"]]
    marks = {k: round(run.first(k)[0] - run.launched, 1) for k in list(OURS_PATTERNS)[2:]
             if run.first(k)}
    return stage_row("ours", n, rows, run, points, cfg.settle, own_rate=float(run.last("progress")[1][2]),
                     startup_marks=marks, errors=count_rows(out / "errors"))


def measure_baseline(cfg, ckpt: Path, dtype: str, root: Path, n: int) -> dict:
    """The naive baseline (transformers' ``pipeline`` loop) over ``n`` local images, in a child process."""
    out = cfg.workdir / "outputs" / f"baseline-{time.time_ns()}"
    out.mkdir(parents=True)
    run = run_child("baseline", {"ckpt": str(ckpt), "device": cfg.device, "dtype": dtype, "images": str(root),
                                 "n": n, "batch_size": cfg.batch_size, "output": str(out)},
                    cfg.logs / f"baseline-{ckpt.name}-{dtype}-{n}.log", cfg.timeout)
    points = [(e["received"], e["n"]) for e in run.events if e["event"] == "progress"]
    points.append(next((e["received"], e["n"]) for e in run.events if e["event"] == "scored"))
    rows = next(e["n"] for e in run.events if e["event"] == "rows")
    return stage_row("baseline" + (" (local files)" if cfg.source == "s3" else ""), n, rows, run, points,
                     cfg.settle)


def measure_peer(cfg, ckpt: Path, dtype: str, source: str, n: int, endpoint: str) -> dict:
    """Ray Data's batch-inference recipe over ``n`` images from ``source``, in a child process."""
    out = cfg.workdir / "outputs" / f"peer-{time.time_ns()}"
    marks = out.with_suffix(".marks")
    # pyarrow's S3 filesystem takes no scheme in the URI when given a filesystem
    path = source.removeprefix("s3://") if endpoint else source
    run = run_child("peer", {"ckpt": str(ckpt), "device": cfg.device, "dtype": dtype, "input": path,
                             "output": str(out), "marks": str(marks), "batch_size": cfg.batch_size,
                             "num_actors": cfg.num_actors, "cpus_per_actor": cfg.peer_cpus_per_actor,
                             "decode_cpus": cfg.peer_decode_cpus, "gpus_per_actor": cfg.gpus_per_actor,
                             "endpoint": endpoint}, cfg.logs / f"peer-{ckpt.name}-{dtype}-{n}.log", cfg.timeout,
                    env=child_env(images.S3Source.CREDENTIALS if endpoint else None))
    batches = sorted((float(t), int(k)) for t, k in (line.split() for line in marks.read_text().splitlines()))
    points = list(zip([t for t, _ in batches], itertools.accumulate(k for _, k in batches)))
    rows = next(e["n"] for e in run.events if e["event"] == "rows")
    return stage_row("peer", n, rows, run, points, cfg.settle)


def stage_row(stage: str, n: int, rows: int, run: procmem.ChildRun, points: list[tuple[float, int]],
              settle: float, **extra) -> dict:
    """A result row from ``points``, (time.time(), images done so far) from the first result on.

    Start-up is launch to the first point. The steady state is measured from
    the first point at least ``settle`` s after the first result (results that
    were queued behind the first one would otherwise inflate it) to the last;
    runs too short for that fall back to the first point (``settled`` False,
    marked in the report). Refuses a run whose output does not hold every image.
    """
    if rows != n:
        raise RuntimeError(f"{stage} wrote {rows} rows for {n} images; not reporting a figure")
    t_first, n_first = points[0]
    t_end, n_end = points[-1]
    t0, n0 = next(((t, k) for t, k in points if t - t_first >= settle and t < t_end), points[0])
    steady = (n_end - n0) / (t_end - t0) if n_end > n0 and t_end > t0 else None
    return {"stage": stage, "images": n, "rows": rows, "rate": steady, "settled": t0 - t_first >= settle,
            "startup_s": t_first - run.launched,
            "wall_s": run.ended - run.launched, "first_n": n_first, "window": [n0, n_end, round(t_end - t0, 1)],
            "memory": run.memory.as_dict(), **extra}


# ---------------------------------------------------------------- parent: the run

def run_stage(results: list, stage: str, fn, cfg, *args) -> None:
    """Run one measurement, recording a failure as a row instead of stopping the benchmark.

    Waits up to ``--wait-idle`` s for other work on the machine to stop first,
    and saves the results so far after the stage (``cfg.save``), so a run cut
    short by a time limit keeps every figure it finished.
    """
    busy, deadline = procmem.busy_cores(), time.monotonic() + cfg.wait_idle
    while busy > 0.25 and time.monotonic() < deadline:
        busy = procmem.busy_cores(5.0)
    logger.info("%s: starting (%.2f cores busy beforehand)", stage, busy)
    try:
        rows = fn(cfg, *args)
    except (SystemExit, KeyboardInterrupt):  # device_run.sh's timeout: say so, keep the rest, stop
        results.append({"stage": stage, "error": "interrupted (time limit)", "busy_before": busy})
        cfg.save()
        raise
    except Exception as exc:  # noqa: BLE001 - one broken stage must not hide the others' figures
        logger.error("%s failed: %s", stage, exc)
        rows = {"stage": stage, "error": str(exc).splitlines()[0]}
    for row in rows if isinstance(rows, list) else [rows]:
        results.append(dict(row, busy_before=busy))
        logger.info("%s", {k: v for k, v in row.items() if k != "memory"})
    cfg.save()


def end_to_end(cfg, ckpt: Path, dtype: str, n: int, rows: list[dict], after=None) -> None:
    """ours, baseline and peer on one image set of N images, their rows appended to ``rows``.

    ``after`` (a callable) runs right after ours: the ceiling's repeat, so that the machine's
    drift is measured around ours' run and not half an hour later.
    """
    root = cfg.workdir / "images" / f"{cfg.kind}-{n}"
    cfg.mean_image_bytes[n] = images.make_images(root, n, cfg.kind, pool=cfg.pool)["mean_bytes"]
    if cfg.source == "s3":
        with images.S3Source(root, n, cfg.s3_latency_ms) as s3:
            options = {"endpoint_url": s3.endpoint}
            _end_to_end(cfg, rows, ckpt, dtype, root, n, s3.uri, options, s3.endpoint, after)
    else:
        _end_to_end(cfg, rows, ckpt, dtype, root, n, str(root), {}, "", after)


def _end_to_end(cfg, rows, ckpt, dtype, root, n, source, options, endpoint, after=None) -> None:
    if "ours" not in cfg.skip:
        run_stage(rows, "ours", measure_ours, cfg, ckpt, dtype, source, n, options)
        if after:
            after()
    compare = n in cfg.compare_at  # baseline and peer need not run at every size
    if "baseline" not in cfg.skip and compare:  # on the first --baseline-images of the set: it is slow
        run_stage(rows, "baseline", measure_baseline, cfg, ckpt, dtype, root, min(n, cfg.baseline_images or n))
    if "peer" not in cfg.skip and compare:
        run_stage(rows, "peer", measure_peer, cfg, ckpt, dtype, source, n, endpoint)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with the layouts and sets it leaves open filled in (options.py)."""
    return options.parse_args(argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """Run the stages the options ask for and write the report."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    # a SIGTERM (device_run.sh's `timeout`) unwinds, so run_measured kills the running stage's
    # process group, which its own session keeps out of reach of the signal, and its Ray cluster
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg.logs.mkdir(parents=True, exist_ok=True)
    meta = {"command": "benchmarks/throughput.py " + shlex.join(argv), "commit": git_commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "hardware": hardware()}
    blocks: list[dict] = []
    raw = cfg.workdir / f"results-{cfg.stamp}.json"
    cfg.mean_image_bytes = {}

    def save() -> None:  # after every stage: the report so far and the raw rows
        raw.write_text(json.dumps({"meta": meta, "blocks": blocks}, indent=2, default=str))
        if cfg.out:
            write_out(cfg.out, format_report(cfg, meta, blocks), {"meta": meta, "blocks": blocks})

    cfg.save = save
    for model in cfg.model:
        ckpt = resolve_model(model, cfg.workdir)
        for dtype in cfg.dtype:
            block = {"model": model, "dtype": dtype, "checkpoint": str(ckpt), "ceiling": [], "runs": {},
                     "mean_image_bytes": cfg.mean_image_bytes}
            blocks.append(block)
            if "ceiling" not in cfg.skip:
                run_stage(block["ceiling"], "ceiling", measure_ceiling, cfg, ckpt, dtype)
            after = None if {"ceiling", "ceiling-after"} & set(cfg.skip) else (  # how far the machine drifted
                lambda: run_stage(block["ceiling"], "ceiling, after", measure_ceiling, cfg, ckpt, dtype, True))
            for i, n in enumerate(cfg.images):  # the repeat brackets ours' first run with the ceiling
                end_to_end(cfg, ckpt, dtype, n, block["runs"].setdefault(n, []), after if i == 0 else None)
    print(format_report(cfg, meta, blocks))
    logger.info("raw results in %s, stage logs in %s", raw, cfg.logs)


if __name__ == "__main__":
    main()
