"""The decode stage alone: images per second per CPU core, and the hand-off to a scoring actor.

For the cost model (docs/scale.md): how many cores feed one GPU, and what
sending pixels as uint8 (what decode tasks send GPU actors, since the split of the
preprocessing) instead of float32 saves. Three measurements, one process
each, on the same images:

1. ``decode``: ``tasks.decode.decode_batch`` over the images in one thread
   (read, decode, preprocess), float32 pixels and uint8 pixels;
2. ``finish``: what the actor then does to uint8 pixels on the CPU
   (``to_model_input``: normalise), per image;
3. ``handoff``: a Ray task returns a decoded batch and an actor receives it
   (the object store's copy and the deserialisation), per image, for both.

    python benchmarks/decode_stage.py --input /tmp/deit-throughput/images/small-1000 \\
        --model /tmp/deit-throughput/checkpoints/random-facebook--deit-tiny-distilled-patch16-224
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _batches(uris: list[str], size: int) -> list[dict]:
    return [{"uri": np.array(uris[i:i + size], dtype=object)} for i in range(0, len(uris), size)]


def measure_decode(uris: list[str], model: str, batch_size: int = 64, rounds: int = 3) -> dict:
    """ms per image of decode_batch in one thread, float32 and uint8, and of the actor's finish.

    The modes alternate for ``rounds`` rounds and each reports its fastest, so
    the page cache and a busy moment of a shared machine favour neither.
    """
    import torch

    from deit_model import create_preprocessor, to_model_input
    from tasks.decode import decode_batch

    torch.set_num_threads(1)  # one core: the unit the cost model counts in
    pre = create_preprocessor(model)
    options = {"preprocessor": pre, "max_pixels": 10**9, "fast_decode": False, "storage_options": {}}
    decode_batch(_batches(uris, 4)[0], **options, uint8=True)  # warm-up: first calls load codecs
    out: dict = {"images": len(uris), "rounds": rounds, "splits_exactly": pre.splits_exactly()}
    for _ in range(rounds):
        for name, uint8 in (("float32", False), ("uint8", True)):
            start, nbytes, decoded = time.perf_counter(), 0, []
            for batch in _batches(uris, batch_size):
                result = decode_batch(batch, **options, uint8=uint8)
                nbytes += result["pixel_values"].nbytes
                decoded.append(result["pixel_values"])
            ms = 1000 * (time.perf_counter() - start) / len(uris)
            best = out.get(name, {}).get("ms_per_image", ms)
            out[name] = {"ms_per_image": min(ms, best), "bytes_per_image": nbytes // len(uris)}
    start = time.perf_counter()
    for pixels in decoded:  # the last loop's: uint8
        to_model_input(pixels, pre, torch.device("cpu"))
    out["finish_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(uris)
    return out


def measure_handoff(shape: tuple, batch_size: int, batches: int) -> dict:
    """ms per image for a Ray task's batch of pixels to reach an actor, float32 and uint8.

    The task allocates the batch (as a decode task does), the object store
    copies it, the actor deserialises it; on one machine (shared memory).
    """
    import ray

    @ray.remote(num_cpus=0.5)
    def produce(dtype: str):
        return {"pixel_values": np.ones((batch_size, *shape), dtype=dtype)}

    @ray.remote(num_cpus=0.5)
    class Consumer:
        def take(self, batch: dict) -> int:
            return int(batch["pixel_values"][:, 0, 0, 0].sum())  # touch it: deserialised here

    consumer = Consumer.remote()
    ray.get(consumer.take.remote(produce.remote("uint8")))  # warm-up: workers started
    out = {}
    for _ in range(2):  # alternating, the faster of two each
        for dtype in ("float32", "uint8"):
            start = time.perf_counter()
            ray.get([consumer.take.remote(produce.remote(dtype)) for _ in range(batches)])
            ms = 1000 * (time.perf_counter() - start) / (batches * batch_size)
            out[dtype] = {"ms_per_image": min(ms, out.get(dtype, {}).get("ms_per_image", ms))}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print them as one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a directory of images (benchmarks/images.py makes them)")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (its preprocessing is used)")
    parser.add_argument("--images", type=int, default=512, help="how many of the images to decode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--handoff-batches", type=int, default=40, help="batches sent from a task to an actor")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uris = sorted(str(p) for p in Path(args.input).rglob("*.jpg"))[:args.images]
    if not uris:
        parser.error(f"no .jpg files under {args.input}; make them with benchmarks/throughput.py or images.py")
    result = {"decode": measure_decode(uris, args.model, args.batch_size)}
    import ray

    from deit_model import create_preprocessor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        shape = create_preprocessor(args.model).input_shape()
        result["handoff"] = measure_handoff(shape, args.batch_size, args.handoff_batches)
    finally:
        ray.shutdown()
    result["cpu"] = os.cpu_count()
    logger.info("%s", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
