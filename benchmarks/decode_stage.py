"""The decode stage alone: images per second per CPU core, and the hand-off to a scoring actor.

For the cost model (docs/scale.md): how many cores feed one GPU, and what
sending pixels as uint8 (what decode tasks send GPU actors, since the split of the
preprocessing) instead of float32 saves. Three measurements, one process
each, on the same images:

1. ``decode``: ``tasks.decode.decode_batch`` over the images in one thread
   (read, decode, preprocess), float32 pixels and uint8 pixels, each with plain JPEGs
   decoded by torchvision where exact (the default, deit_model/cpu_jpeg.py) and by PIL
   alone (``_pil``), and with transformers' steps run on channels-last batches where exact
   (the default, deit_model/hf_steps.py) and by the processor's own call (``_library``); and with
   ``device_jpeg`` (``--device-decode``: read and check the headers only);
2. ``finish``: what the actor then does to uint8 pixels on the CPU
   (``to_model_input``: normalise), per image; and to device-decode JPEGs
   with the CPU as the device (``device_finish``: torchvision's decode and
   resize, the work nvJPEG and the GPU take over);
3. ``handoff``: a Ray task returns a decoded batch and an actor receives it
   (the object store's copy and the deserialisation), per image, for both,
   and for ``--device-decode``'s JPEG bytes (110 KB per image, packed).

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


# (name, decode_batch's options, switches): "_pil" has PIL decode every image (deit_model/cpu_jpeg.py),
# "_library" has transformers' processor run its own call (deit_model/hf_steps.py)
_MODES = (("float32", {}, {}), ("float32_pil", {}, {"jpeg": "pil"}), ("float32_library", {}, {"steps": "library"}),
          ("uint8", {"uint8": True}, {}), ("uint8_pil", {"uint8": True}, {"jpeg": "pil"}),
          ("uint8_library", {"uint8": True}, {"steps": "library"}), ("device_jpeg", {"device_jpeg": True}, {}))


def measure_decode(uris: list[str], model: str, batch_size: int = 64, rounds: int = 3) -> dict:
    """ms per image of decode_batch in one thread, float32 and uint8, and of the actor's finish.

    The modes alternate for ``rounds`` rounds and each reports its fastest, so
    the page cache and a busy moment of a shared machine favour neither.
    """
    import torch

    from deit_model import cpu_jpeg, create_preprocessor, hf_steps, to_model_input
    from tasks.decode import decode_batch
    from tasks.device_jpeg import device_model_input

    torch.set_num_threads(1)  # one core: the unit the cost model counts in
    pre = create_preprocessor(model)
    options = {"preprocessor": pre, "max_pixels": 10**9, "fast_decode": False, "storage_options": {}}
    decode_batch(_batches(uris, 4)[0], **options, uint8=True)  # warm-up: first calls load codecs
    out: dict = {"images": len(uris), "rounds": rounds, "splits_exactly": pre.splits_exactly(),
                 "plain_jpegs_by_torchvision": cpu_jpeg.exact_for(pre),
                 "steps_on_channels_last_batches": pre.channels_last_steps()}
    decoded: dict[str, list] = {}
    switches = {"jpeg": cpu_jpeg.ENV, "steps": hf_steps.ENV}
    for _ in range(rounds):
        for name, mode, switched in _MODES:
            os.environ.update({var: switched.get(key, "auto") for key, var in switches.items()})
            start, decoded[name] = time.perf_counter(), []
            for batch in _batches(uris, batch_size):
                decoded[name].append(decode_batch(batch, **options, **mode))
            ms = 1000 * (time.perf_counter() - start) / len(uris)
            best = out.get(name, {}).get("ms_per_image", ms)
            out[name] = {"ms_per_image": min(ms, best), "bytes_per_image": _bytes(decoded[name]) // len(uris)}
    for var in switches.values():
        os.environ.pop(var)
    cpu = torch.device("cpu")
    out["finish_ms_per_image"] = _ms(lambda b: to_model_input(b["pixel_values"], pre, cpu), decoded["uint8"])
    out["device_finish_ms_per_image"] = _ms(lambda b: device_model_input(b, pre, cpu), decoded["device_jpeg"])
    return out


def _bytes(batches: list[dict]) -> int:
    """What the decoded batches hand on: pixels, or the JPEG bytes and the other images' pixels."""
    if "pixel_values" in batches[0]:
        return sum(b["pixel_values"].nbytes for b in batches)
    return sum(b["jpeg_data"].nbytes + b["jpeg_offsets"].nbytes + b["jpeg_pixels"].nbytes for b in batches) + sum(
        p.nbytes for b in batches for p in b["pixels"] if p is not None)


def _ms(finish, batches: list[dict]) -> float:
    """ms per image of ``finish`` over the batches."""
    start = time.perf_counter()
    for batch in batches:
        finish(batch)
    return 1000 * (time.perf_counter() - start) / sum(len(b["uri"]) for b in batches)


def measure_handoff(shape: tuple, batch_size: int, batches: int, jpeg_bytes: int = 110_000) -> dict:
    """ms per image for a Ray task's batch of pixels to reach an actor, float32 and uint8, or of JPEGs.

    The task allocates the batch (as a decode task does), the object store
    copies it, the actor deserialises it; on one machine (shared memory).
    """
    import ray

    @ray.remote(num_cpus=0.5)
    def produce(dtype: str):
        if dtype == "jpeg":  # as decode_batch packs them: one buffer, the offsets, the pixel counts
            return {"jpeg_data": np.ones(batch_size * jpeg_bytes, dtype=np.uint8),
                    "jpeg_offsets": np.arange(batch_size + 1, dtype=np.int64) * jpeg_bytes,
                    "jpeg_pixels": np.full(batch_size, 500 * 375, dtype=np.int64)}
        return {"pixel_values": np.ones((batch_size, *shape), dtype=dtype)}

    @ray.remote(num_cpus=0.5)
    class Consumer:
        def take(self, batch: dict) -> int:
            if "jpeg_data" in batch:  # touch every image's first byte
                return int(batch["jpeg_data"][batch["jpeg_offsets"][:-1]].sum())
            return int(batch["pixel_values"][:, 0, 0, 0].sum())  # touch it: deserialised here

    consumer = Consumer.remote()
    ray.get(consumer.take.remote(produce.remote("uint8")))  # warm-up: workers started
    out = {}
    for _ in range(2):  # alternating, the faster of two each
        for dtype in ("float32", "uint8", "jpeg"):
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
