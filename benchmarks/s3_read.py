"""The CPU that reading images from an object store costs the reader: obstore against s3fs.

The S3-protocol test server (moto, ``benchmarks/images.py``) serves the images from this
process, pinned to the last core, and waits ``--latency-ms`` before each answer. A child
process pinned to the first core reads batches of ``--batch-size`` through the pipeline's own
``tasks.storage.ReadStream`` (chunks of 32, two in flight, as a decode task reads), with the
S3 reads going through obstore (``tasks.s3_reader``, the default) or through s3fs alone
(``DEIT_S3_READER=s3fs``), alternating for ``--rounds``. Each round reports the reader's CPU
per object (its process time, all threads) and its wall time per object; the server's own
work is on the other core and in neither. Prints one JSON object.

    python benchmarks/s3_read.py --latency-ms 0 50
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

logger = logging.getLogger(__name__)
MODES = ("s3fs", "obstore")


def _reader(conn, uri: str, endpoint: str, batch_size: int) -> None:
    """The child: answers (mode, batches) with (CPU ms per object, wall ms per object), or its error."""
    try:
        _serve(conn, uri, endpoint, batch_size)
    except Exception as exc:  # noqa: BLE001 - the parent would wait for an answer forever
        conn.send(exc)


def _serve(conn, uri: str, endpoint: str, batch_size: int) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from tasks import s3_reader
    from tasks.enumerate import list_images
    from tasks.storage import ReadStream, filesystem

    options = {"endpoint_url": endpoint}
    uris = [o.uri for o in list_images(uri, options)]
    batches = [uris[i:i + batch_size] for i in range(0, len(uris) - batch_size + 1, batch_size)]
    k = 0
    while (msg := conn.recv()) is not None:
        mode, n = msg
        os.environ[s3_reader.ENV] = mode
        used = s3_reader.reader_for(filesystem(uris[0], options)[0]) is not None
        assert used == (mode == "obstore"), f"{mode}: obstore {'used' if used else 'not used'}"
        todo = [batches[(k + i) % len(batches)] for i in range(n)]
        k += n
        cpu, wall = time.process_time(), time.perf_counter()
        for batch in todo:
            with ReadStream(batch, options) as stream:
                assert all(isinstance(data, bytes) for data in stream)
        objects = n * batch_size
        conn.send((1000 * (time.process_time() - cpu) / objects, 1000 * (time.perf_counter() - wall) / objects))


def _ask(conn, mode: str, batches: int) -> tuple[float, float]:
    conn.send((mode, batches))
    answer = conn.recv()
    if isinstance(answer, Exception):
        raise answer
    return answer


def main(argv: list[str] | None = None) -> None:
    """Serve the images, start the reader, alternate the modes at each latency; print JSON."""
    import images  # benchmarks/, beside this file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    images.add_served_arguments(p, latency_ms=[0.0, 50.0], batch_size=128, batches=4, rounds=5)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: dict = {"batch_size": a.batch_size, "batches": a.batches, "cores": len(os.sched_getaffinity(0)),
                     "latency_ms": {}}
    with images.served_to_child(a.images, _reader, a.batch_size) as (s3, conn):
        for mode in MODES:  # warm-up: connections, the first store
            _ask(conn, mode, 1)
        for latency in a.latency_ms:
            s3._server.latency_s = latency / 1000
            rounds: dict = {mode: [] for mode in MODES}
            for _ in range(a.rounds):
                for mode in MODES:
                    rounds[mode].append([round(x, 3) for x in _ask(conn, mode, a.batches)])
            results["latency_ms"][f"{latency:g}"] = {
                mode: {"rounds_cpu_wall_ms": r, "median_cpu_ms": statistics.median(x[0] for x in r),
                       "median_wall_ms": statistics.median(x[1] for x in r)} for mode, r in rounds.items()}
            logger.info("latency %g ms: %s", latency, results["latency_ms"][f"{latency:g}"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
