"""throughput.py's command line: its options, and the actor layouts they leave open.

Split from throughput.py, which runs the stages; this only reads what to run.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import images
from tasks.placement import default_batch_size

STAGES = ("ceiling", "ours", "baseline", "peer")


def parse_args(argv: list[str], description: str) -> argparse.Namespace:
    """throughput.py's options, with the layouts, compared sizes and ceiling threads filled in."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (_add_workload, _add_layout, _add_harness):
        add(p)
    cfg = p.parse_args(argv)
    if cfg.s3_latency_ms and (cfg.source != "s3" or cfg.s3_latency_ms < 0):
        p.error("--s3-latency-ms is a wait of 0 ms or more, and only with --source s3")
    if cfg.batch_size is None:
        cfg.batch_size = default_batch_size(cfg.device == "cuda")
    if cfg.batch_size not in cfg.batch_sizes:
        cfg.batch_sizes.append(cfg.batch_size)
    default_layout(cfg, os.cpu_count() or 1)
    if cfg.progress_seconds is None:
        cfg.progress_seconds = 0.5 if cfg.device == "cuda" else 10.0
    if cfg.compare_at is None:
        cfg.compare_at = [min(cfg.images)]
    if cfg.ceiling_threads is None:
        cfg.ceiling_threads = sorted({max(math.floor(cfg.cpus_per_actor), 1), os.cpu_count() or 1})
    cfg.workdir = cfg.workdir.resolve()
    # one folder per invocation: device_run.sh runs the same model, dtype and set in several
    # invocations, whose stage logs had the same names and overwrote each other
    cfg.stamp = time.strftime("%Y%m%dT%H%M%S")
    cfg.logs = cfg.workdir / "logs" / cfg.stamp
    return cfg


def _add_workload(p: argparse.ArgumentParser) -> None:
    """What is measured: the image sets, the models and the dtypes."""
    p.add_argument("--images", type=int, nargs="+", default=[1000], help="image counts (one e2e run each)")
    p.add_argument("--compare-at", type=int, nargs="+", default=None,
                   help="image counts at which baseline and peer run too (default: the smallest of --images)")
    p.add_argument("--baseline-images", type=int, default=None,
                   help="the baseline scores only the first N images of each compared set (it decodes in one "
                        "process; on a GPU a set big enough for ours' steady state would take it minutes)")
    p.add_argument("--kind", choices=sorted(images.KINDS), default="small",
                   help="small: 500x375 ~110 KB JPEGs; phone: 4000x3000 ~3 MB")
    p.add_argument("--source", choices=["local", "s3"], default="local",
                   help="s3: moto's S3 server on 127.0.0.1 (baseline still reads the local files)")
    p.add_argument("--s3-latency-ms", type=float, default=0.0,
                   help="with --source s3: every request waits this long before moto answers it, as a real "
                        "object store's time to first byte (default 0: a server on 127.0.0.1 has none)")
    p.add_argument("--model", nargs="+", default=["facebook/deit-tiny-distilled-patch16-224"],
                   help="hub names (built with random weights) or checkpoint directories")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"])


def _add_layout(p: argparse.ArgumentParser) -> None:
    """How the stages run: batch sizes, actors, CPUs and decode."""
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64], help="ceiling batch sizes")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size of the end-to-end stages; default: the product's for the device (16 on cpu, "
                        "128 on cuda)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="default: 1 on cuda; one per core on cpu (one 1-thread model per core)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="default: 1 on cuda; on cpu the cores less the decode CPUs, shared by the actors")
    p.add_argument("--decode-cpus", type=float, default=None,
                   help="default: 1 on cuda, 0 on cpu (ours decodes in its actors; the peer's recipe has "
                        "separate read and preprocess tasks and gets half a core for them)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--fast-decode", action="store_true", help="pass --fast-decode to ours")
    p.add_argument("--ours-args", default="", help="more score-images run options, one shell string")
    p.add_argument("--ceiling-threads", type=int, nargs="+", default=None,
                   help="CPU thread counts for the ceiling (default: the actor's, and all cores)")
    p.add_argument("--ceiling-seconds", type=float, default=8.0, help="timed seconds per ceiling point")


def _add_harness(p: argparse.ArgumentParser) -> None:
    """What the harness does around the stages: which run, where files go, timing."""
    p.add_argument("--skip", nargs="+", action="extend", choices=STAGES + ("ceiling-after",), default=[],
                   help="stages to leave out (repeatable); ceiling-after: the ceiling's repeat after the "
                        "end-to-end stages (the drift check, which a GPU's steady clock makes least needed)")
    p.add_argument("--pool", type=int, default=None, help="distinct images per set (default: 256 small, 16 phone)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/deit-throughput"),
                   help="images, checkpoints, outputs and logs; image sets and checkpoints are reused")
    p.add_argument("--out", type=Path, default=None, help="docs/benchmarks.md (markdown) or a .json file")
    p.add_argument("--progress-seconds", type=float, default=None,
                   help="ours' progress interval, its timing points (default: 0.5 on cuda, 10 on cpu)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds after the first result before the steady-state window opens")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="seconds to wait, before each stage, for other work on the machine to stop")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before a stage is killed")


def default_layout(cfg: argparse.Namespace, cores: int) -> None:
    """Fill in the actor layouts (ours, and the peer's) the flags left open.

    On a GPU one actor feeds the device. On a CPU the model itself is the
    work: one single-threaded actor per core scores more than one actor with
    a thread per core (two processes x 1 thread made 67.5 img/s against 68.0
    for 1 x 2 threads here), and ours decodes inside its actors (decode_cpus
    0), as decode and model share the cores anyway. The peer's recipe keeps
    its separate read and preprocess tasks, with half a core for them. Torch
    threads beyond the cores (an actor and decode tasks both multi-threaded)
    cut throughput about four-fold here (12 against 50 img/s, docs/benchmarks.md), so no layout oversubscribes.
    """
    cpu = cfg.device == "cpu"
    if cfg.num_actors is None:
        cfg.num_actors = cores if cpu else 1
    if cfg.decode_cpus is None:
        cfg.decode_cpus = 0.0 if cpu else 1.0
    if cfg.cpus_per_actor is None:
        cfg.cpus_per_actor = round((cores - cfg.decode_cpus) / cfg.num_actors, 2) if cpu else 1.0
    cfg.peer_decode_cpus, cfg.peer_cpus_per_actor = cfg.decode_cpus, cfg.cpus_per_actor
    if cfg.decode_cpus == 0:  # the recipe's read and preprocess tasks need CPUs of their own
        cfg.peer_decode_cpus = 0.5 if cpu else 1.0
        if cpu:
            cfg.peer_cpus_per_actor = round((cores - cfg.peer_decode_cpus) / cfg.num_actors, 2)
