"""What bounds a CPU actor that decodes its own images: its loop taken apart, on the real code.

Each of ``--processes`` processes (one per core, one torch thread each, as the
default CPU layout runs its actors) alternates rounds of

1. ``forward``: the model alone on a random batch (the ceiling's measurement);
2. ``loop``: ``decode_batch`` on the next batch of real images, then
   ``Scorer.score`` on its pixels, as ``ScoringActor.score_batch`` does, each timed;

so the forward pass after a decode is compared with the forward pass alone at the
same moment of the machine, and the decode's share is measured, not inferred. It
prints one JSON object: per process, ms per image of each part (medians of the
rounds' batches, and their means as ``<part>_mean``), and ``cap``, the fraction of the
ceiling that a pipeline doing this loop on every core can reach (forward alone /
(score after decode + decode); ``cap_of_means`` from the means), before what the rest
of the pipeline (Ray, Prefect, the driver) takes.

    python benchmarks/actor_loop.py --input /tmp/deit-throughput/images/small-10000 \\
        --model /tmp/deit-throughput/checkpoints/random-facebook--deit-tiny-distilled-patch16-224
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _loop(index: int, uris: list[str], args: dict, queue) -> None:
    """One process: the rounds above; puts (index, {part: ms per image})."""
    import torch

    from deit_model import create_scorer, keep_freed_memory, load_preprocessor
    from tasks.decode import decode_batch

    torch.set_num_threads(1)
    scorer = create_scorer(args["model"], device="cpu", dtype="fp32")
    keep_freed_memory()  # as the actors do after loading
    pre, size = load_preprocessor(scorer.ref.local_dir), args["batch_size"]
    batches = [{"uri": np.array(uris[i:i + size], dtype=object)} for i in range(0, len(uris) - size + 1, size)]
    x = torch.randn(size, *pre.input_shape())
    times: dict[str, list[float]] = {"forward": [], "decode": [], "score_after_decode": []}
    k = 0
    for _ in range(args["rounds"]):
        with torch.inference_mode():
            for _ in range(args["batches"]):
                start = time.perf_counter()
                scorer.model(x)
                times["forward"].append(time.perf_counter() - start)
        for _ in range(args["batches"]):
            start = time.perf_counter()
            out = decode_batch(batches[k % len(batches)], preprocessor=pre, max_pixels=10**9, fast_decode=False,
                               storage_options={})
            middle = time.perf_counter()
            scorer.score(out["pixel_values"])
            times["decode"].append(middle - start)
            times["score_after_decode"].append(time.perf_counter() - middle)
            k += 1
    parts = {part: 1000 * statistics.median(t) / size for part, t in times.items()}
    # the median leaves out a batch held up by another process or a collection; a rate counts it
    parts.update({f"{part}_mean": 1000 * statistics.fmean(t) / size for part, t in times.items()})
    queue.put((index, parts))


def measure(uris: list[str], model: str, processes: int, batch_size: int = 16, rounds: int = 4,
            batches: int = 25) -> dict:
    """Run the loop in ``processes`` processes side by side, each on its own share of ``uris``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    args = {"model": model, "batch_size": batch_size, "rounds": rounds, "batches": batches}
    share = len(uris) // processes
    procs = [ctx.Process(target=_loop, args=(i, uris[i * share:(i + 1) * share], args, queue))
             for i in range(processes)]
    for p in procs:
        p.start()
    parts = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    out = {"processes": processes, "batch_size": batch_size, "rounds": rounds, "batches_per_round": batches,
           "per_process": [parts[i] for i in range(processes)]}
    mean = {part: statistics.fmean(p[part] for p in out["per_process"]) for part in parts[0]}
    out["mean_ms_per_image"] = mean
    out["forward_slowdown_after_decode"] = mean["score_after_decode"] / mean["forward"]
    out["cap"] = mean["forward"] / (mean["score_after_decode"] + mean["decode"])
    out["cap_of_means"] = mean["forward_mean"] / (mean["score_after_decode_mean"] + mean["decode_mean"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run :func:`measure` and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a directory of images (benchmarks/images.py makes them)")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="side by side (default: one per core)")
    parser.add_argument("--images", type=int, default=4000, help="how many of the images, shared out")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    uris = sorted(str(p) for p in Path(args.input).rglob("*.jpg"))[:args.images]
    if len(uris) < args.processes * args.batch_size:
        parser.error(f"--input: {len(uris)} .jpg files, fewer than a batch per process")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(uris, args.model, args.processes, args.batch_size, args.rounds)
    logger.info("%s", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
