"""A CPU actor that reads its images from an object store: one call at a time against reading ahead.

The S3-protocol test server (moto, ``benchmarks/images.py``) serves the images from this
process, pinned to the last core, and waits ``--latency-ms`` before each answer (a real
store's time to first byte, which a server on 127.0.0.1 lacks). One ``ScoringActor`` (the
real class, without Ray) runs in a child process pinned to the first core with one torch
thread, as the CPU layout's actors run, and scores batches of ``--batch-size`` in two modes:

* ``serial``: one call at a time, each reading its batch and then decoding and scoring it
  (what a CPU actor did before 2026-12-05, ``max_concurrency=1``);
* ``read_ahead``: two call threads with a third call waiting, as Ray runs an actor with
  ``max_concurrency=2`` under the pool's window of 3: one call decodes and scores while the
  next reads (``ScoringActor``'s one CPU-work thread).

The modes alternate for ``--rounds`` at each latency, so a busy moment of a shared machine
favours neither; it prints one JSON object with each round's images per second. The server's
own work (about 6 ms of its core per 110 KB object) is on the other core, so what differs
between the modes is only whether the actor's core waits for the reads.

    python benchmarks/read_ahead.py --latency-ms 0 20 50 \\
        --model /tmp/deit-throughput/checkpoints/random-facebook--deit-tiny-distilled-patch16-224
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

logger = logging.getLogger(__name__)


def _actor(conn, uri: str, endpoint: str, model: str, batch_size: int) -> None:
    """The child: one ScoringActor on the first core; answers ("serial"|"read_ahead", n) with img/s."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    from deit_model import embedding_dim
    from tasks.actor_pool import plan_batches
    from tasks.enumerate import list_images, plan_table
    from tasks.schema import OutputSpec
    from tasks.score import BatchContext, ScoringActor

    torch.set_num_threads(1)
    options = {"endpoint_url": endpoint}
    actor = ScoringActor(model=model, revision=None, device="cpu", dtype="fp32", top_k=5, storage_options={})
    batches = list(plan_batches(plan_table(list(list_images(uri, options))), batch_size))
    decode = {"max_pixels": 10**9, "fast_decode": False, "storage_options": options}
    context = BatchContext("bench", model, OutputSpec(embedding_dim(actor.scorer.ref.local_dir)), decode)
    actor.score_batch(batches[0], context)  # warm-up: codecs, the exactness checks, the first connections
    k = 0
    while (msg := conn.recv()) is not None:
        mode, n = msg
        todo = [batches[(k + i) % len(batches)] for i in range(n)]
        k += n
        start = time.perf_counter()
        if mode == "serial":
            for batch in todo:
                actor.score_batch(batch, context)
        else:
            _two_threads(actor, todo, context)
        conn.send(n * batch_size / (time.perf_counter() - start))


def _two_threads(actor, batches: list, context, window: int = 3) -> None:
    """Calls on two threads with ``window`` submitted at most, as Ray and the pool run them."""
    with ThreadPoolExecutor(2) as pool:
        pending, queue = set(), list(batches)
        while queue or pending:
            while queue and len(pending) < window:
                pending.add(pool.submit(actor.score_batch, queue.pop(0), context))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()


def main(argv: list[str] | None = None) -> None:
    """Serve the images, start the actor, alternate the modes at each latency; print JSON."""
    import images  # benchmarks/, beside this file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    images.add_served_arguments(p, latency_ms=[0.0, 20.0, 50.0], batch_size=32, batches=12, rounds=3)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: dict = {"batch_size": a.batch_size, "batches": a.batches, "cores": len(os.sched_getaffinity(0)),
                     "latency_ms": {}}
    with images.served_to_child(a.images, _actor, a.model, a.batch_size) as (s3, conn):
        for latency in a.latency_ms:
            s3._server.latency_s = latency / 1000
            rates: dict = {"serial": [], "read_ahead": []}
            for _ in range(a.rounds):
                for mode in rates:
                    conn.send((mode, a.batches))
                    rates[mode].append(round(conn.recv(), 2))
            results["latency_ms"][f"{latency:g}"] = rates
            logger.info("latency %g ms: %s", latency, rates)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
