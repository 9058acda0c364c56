"""GPU correctness in one command: the device's pixels and scores against the CPU's, per seed model.

For a lent H100/H200 (docs/benchmarks.md, "GPU"), needing only torch,
transformers, timm and pillow (the GPU machine has them; Ray and Prefect do
not travel there whole). For each model, on benchmark-sized images:

- ``pixels_equal``: the decode tasks' uint8 half finished on the device
  (``to_model_input``) equals the CPU's whole preprocessing bit for bit;
- fp32 on the device against fp32 on the CPU: top-1 agreement and the
  largest score difference; bf16 on the device: top-1 agreement and the
  smallest embedding cosine;
- ``device_decode`` (``--device-decode``: the JPEGs decoded and resized on
  the device, nvJPEG on CUDA): how far its pixels are from PIL's on the CPU
  (mean and largest difference in 8-bit levels) and fp32 top-1 agreement and
  smallest embedding cosine against the CPU; and its rate (``img_per_s``:
  decode, resize and normalise of batches of 128, the model not included). Expected to differ a little,
  unlike ``pixels_equal``; the figures go to docs/agreement.md. ``two_threads``: the same
  decode and scoring on two threads at once, as a GPU actor runs its two calls, against one
  at a time (scores should agree to rounding: a decoder that wrote into memory another call
  still reads would not). ``overlap``: decode and the bf16 forward pass, each alone and then
  both at once on two threads, in images per second: whether one process can keep the GPU
  busy with both, which the actor's ``--device-decode`` needs.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/gpu_check.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

import images  # noqa: E402 - sibling module (this directory is sys.path[0])

logger = logging.getLogger(__name__)

MODELS = ("facebook/deit-base-distilled-patch16-224", "timm:cait_m36_384.fb_dist_in1k")


def _checkpoint(name: str, root: Path) -> Path:
    from deit_model import create_random_checkpoint, create_random_timm_checkpoint

    out = root / name.replace("/", "--").replace(":", "-")
    if name.startswith("timm:"):
        return create_random_timm_checkpoint(name[len("timm:"):], out)
    return create_random_checkpoint(name, out)


def check_model(ckpt: str, jpegs: list[bytes], device: str) -> dict:
    """Pixels and scores on ``device`` against the CPU in fp32, for one checkpoint (both parts)."""
    out = check_exact(ckpt, jpegs, device)
    out["device_decode"] = check_device_decode(ckpt, jpegs, device)
    return out


def check_exact(ckpt: str, jpegs: list[bytes], device: str) -> dict:
    """The default path: the decode tasks' uint8 pixels finished on ``device``, and its scores."""
    import torch

    from deit_model import Scorer, load_preprocessor, resolve_checkpoint, to_model_input

    pre, ref, dev = load_preprocessor(ckpt), resolve_checkpoint(ckpt), torch.device(device)
    pil_images, cpu_pixels, cpu = _cpu_reference(ckpt, tuple(jpegs))
    expected = torch.from_numpy(cpu_pixels)
    on_device = to_model_input(pre.to_uint8(pil_images), pre, dev)
    out = {"splits_exactly": pre.splits_exactly(), "pixels_equal": bool(torch.equal(on_device.cpu(), expected)),
           "pixels_max_abs_diff": float((on_device.cpu() - expected).abs().max())}
    out["bf16"] = _agreement(Scorer(ref, device=device, dtype="bf16").score(on_device), cpu)
    out["fp32"] = _agreement(Scorer(ref, device=device, dtype="fp32").score(on_device), cpu)
    return out


def check_device_decode(ckpt: str, jpegs: list[bytes], device: str) -> dict:
    """``--device-decode``: the device's pixels and scores against PIL's on the CPU, its rate, its overlap."""
    import torch

    from deit_model import Scorer, jpegs_to_model_input, load_preprocessor, resolve_checkpoint

    pre, ref, dev = load_preprocessor(ckpt), resolve_checkpoint(ckpt), torch.device(device)
    try:  # its own failure must not cost the exact figures (one device call is all there is)
        _, cpu_pixels, cpu = _cpu_reference(ckpt, tuple(jpegs))
        expected = torch.from_numpy(cpu_pixels)
        fp32 = Scorer(ref, device=device, dtype="fp32")
        decoded, refused = jpegs_to_model_input(jpegs, pre, dev)
        std = torch.tensor(_std(pre)).view(1, -1, 1, 1)  # per channel: back to 8-bit levels
        levels = (decoded.cpu() - expected).abs() * 255 * std
        return {"refused": len(refused), "mean_level_diff": float(levels.mean()),
                "max_level_diff": float(levels.max()), "broken": _broken_one(jpegs, pre, dev, decoded),
                **_agreement(fp32.score(decoded), cpu),
                "img_per_s": _decode_rate(jpegs, pre, dev), "two_threads": _two_threads(jpegs, pre, fp32, dev),
                "overlap": _overlap(jpegs, pre, Scorer(ref, device=device, dtype="bf16"), dev)}
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        logger.exception("device decode failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _broken_one(jpegs: list[bytes], pre, dev, decoded) -> dict:
    """A JPEG whose headers read and whose Huffman table is garbage, among the good ones.

    The device path's refusals (the batched call failing, one-by-one decoding, PIL taking
    the rest: a corrupt_image row) had run only on the CPU's libjpeg-turbo; whether nvJPEG
    refuses such a file or decodes junk from it is what this records. ``refused`` should be
    the broken one's index alone, and the others' pixels those of the clean batch.
    """
    import torch

    from deit_model import jpegs_to_model_input

    b = bytearray(jpegs[0])  # as tests/test_device_decode.py's bad_huffman
    i = b.index(b"\xff\xc4")
    b[i + 4:i + 20] = b"\xff" * 16
    at = len(jpegs) // 2
    mixed, refused = jpegs_to_model_input([*jpegs[:at], bytes(b), *jpegs[at:]], pre, dev)
    others_equal = mixed is not None and mixed.shape[0] == len(jpegs) and bool(torch.equal(mixed.cpu(), decoded.cpu()))
    return {"refused": refused, "expected": [at], "others_equal": others_equal}


@functools.lru_cache(maxsize=None)
def _cpu_reference(ckpt: str, jpegs: tuple[bytes, ...]):
    """(PIL images, the CPU's whole preprocessing of them, its fp32 scores on the CPU): what every
    device is held to. Once per model: the exact and the device-decode checks share it (CaiT-M36's
    CPU forward pass and its 1 GB of weights are seconds of a device call's time)."""
    from deit_model import Scorer, decode_image, load_preprocessor, resolve_checkpoint

    pil_images = [decode_image(j) for j in jpegs]
    pixels = load_preprocessor(ckpt)(pil_images)
    return pil_images, pixels, Scorer(resolve_checkpoint(ckpt), device="cpu", dtype="fp32").score(pixels)


def _decode_rate(jpegs: list[bytes], pre, device, batch: int = 128, rounds: int = 3) -> float:
    """Images per second of decode + resize + normalise on ``device``, batches of ``batch`` (best round)."""
    import time

    import torch

    from deit_model import jpegs_to_model_input

    data = (jpegs * (batch // len(jpegs) + 1))[:batch]
    best = float("inf")
    for i in range(rounds + 1):
        start = time.perf_counter()
        jpegs_to_model_input(data, pre, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call warms up (nvJPEG's handles, the kernels): not counted
            best = min(best, time.perf_counter() - start)
    return batch / best


def _two_threads(jpegs: list[bytes], pre, scorer, device, batches: int = 8) -> dict:
    """Device decode and scoring on two threads at once, as a GPU actor runs them, against one at a time.

    Each thread works on its own stream (``Scorer.stream()``) and one forward
    pass runs at a time, as in ``tasks.score.ScoringActor``; a decoder writing
    into memory another call still reads would show here as scores that differ.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from deit_model import jpegs_to_model_input

    lock = threading.Lock()
    batch = 4 * len(jpegs)  # 64 for the default 16 images; each batch starts at another image
    work = [[jpegs[(i + j) % len(jpegs)] for j in range(batch)] for i in range(batches)]

    def score(data):
        with scorer.stream():
            x, _ = jpegs_to_model_input(data, pre, device)
            with lock:
                return scorer.score(x)

    alone = [score(data) for data in work]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(score, work))
    diffs = [float(np.abs(a.scores - t.scores).max()) for a, t in zip(alone, together)]
    agree = [float((a.label_ids == t.label_ids).mean()) for a, t in zip(alone, together)]
    return {"max_score_diff": max(diffs), "label_agree": min(agree), "batches": batches, "batch": batch}


def _overlap(jpegs: list[bytes], pre, scorer, device, batch: int = 128, seconds: float = 1.5) -> dict:
    """Whether device decode and the forward pass overlap in one process, as a GPU actor needs them to.

    Each runs alone, batches of ``batch`` for ``seconds``, then both at once on two threads (each
    on its own CUDA stream, as the actor's calls): images per second of each. With the forward
    pass's rate kept and the decode's added, they overlap; with the two sharing one rate, close
    to ``serial`` (1 / (1/decode + 1/forward)), something makes them take turns (the decoder's
    process-wide lock and its stream synchronisations, or the GPU itself). The first H200 run's
    actor made 1.08x ``serial`` (docs/benchmarks.md); this separates the decode from the rest.
    """
    from deit_model import jpegs_to_model_input

    data = (jpegs * (batch // len(jpegs) + 1))[:batch]
    with scorer.stream():
        x, _ = jpegs_to_model_input(data, pre, device)

    def decode():
        with scorer.stream():
            jpegs_to_model_input(data, pre, device)
            _sync(device)  # this thread's stream only: a device-wide wait would make them take turns

    def forward():
        with scorer.stream():
            scorer.score(x)  # its results come back to the host: synchronised

    (decode_alone,), (forward_alone,) = _rates([decode], batch, seconds), _rates([forward], batch, seconds)
    decode_both, forward_both = _rates([decode, forward], batch, seconds)
    serial = 1 / (1 / decode_alone + 1 / forward_alone)
    # an actor needs both for every image: the slower of the two, run together, bounds it
    together = min(decode_both, forward_both)
    return {"batch": batch, "decode_alone": decode_alone, "forward_alone": forward_alone,
            "decode_together": decode_both, "forward_together": forward_both, "serial": serial,
            "together": together, "together_over_serial": together / serial,
            "together_over_forward_alone": together / forward_alone}


def _rates(works: list, batch: int, seconds: float) -> list[float]:
    """Images per second of each of ``works`` (one batch a call), run together on a thread each for ``seconds``."""
    import threading
    import time

    def loop(work, stop: threading.Event, done: list) -> None:
        while not stop.is_set():
            work()
            done.append(time.perf_counter())

    for work in works:
        work()  # warm-up, not counted
    stop, done = threading.Event(), [[] for _ in works]
    threads = [threading.Thread(target=loop, args=(w, stop, d)) for w, d in zip(works, done)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return [len(d) * batch / (d[-1] - start) if d else 0.0 for d in done]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _std(pre) -> list[float]:
    """The normalisation's std (pixel differences back to 8-bit levels)."""
    d = pre.to_dict()
    return list(d.get("image_std") or d.get("std"))


def _agreement(res, cpu) -> dict:
    cos = (res.embedding * cpu.embedding).sum(1) / (
        np.linalg.norm(res.embedding, axis=1) * np.linalg.norm(cpu.embedding, axis=1))
    return {"top1_agree": float((res.label_ids[:, 0] == cpu.label_ids[:, 0]).mean()),
            "max_score_diff": float(np.abs(res.scores - cpu.scores).max()),
            "min_embedding_cosine": float(cos.min())}


def main(argv: list[str] | None = None) -> int:
    """Check each model and write the results as JSON to ``--out`` (and the log)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device to check against the CPU (default cuda)")
    parser.add_argument("--model", nargs="+", default=list(MODELS), help="hub names; random weights are written")
    parser.add_argument("--images", type=int, default=16, help="benchmark-sized JPEGs to score")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    jpegs = [images.render(images.KINDS["small"], seed) for seed in range(args.images)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {}
        # the exact path of every model first, then --device-decode's: a time limit that stops the
        # run keeps what was done, most important first (the first H200 run lost CaiT's pixels so)
        for part, check in (("exact", check_exact), ("device_decode", check_device_decode)):
            for name in args.model:
                if name not in ckpts:
                    ckpts[name] = str(_checkpoint(name, Path(tmp)))
                found = check(ckpts[name], jpegs, args.device)
                results.setdefault(name, {}).update(found if part == "exact" else {part: found})
                logger.info("%s, %s: %s", name, part, json.dumps(found))
                if args.out:  # after each: a time limit that stops the next keeps this one's
                    Path(args.out).write_text(json.dumps(results, indent=2))
    exact = all(r.get("pixels_equal") for r in results.values())
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
