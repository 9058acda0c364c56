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
  still reads would not).

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/gpu_check.json
"""
from __future__ import annotations

import argparse
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
    """Pixels and scores on ``device`` against the CPU in fp32, for one checkpoint."""
    import torch

    from deit_model import (Scorer, decode_image, jpegs_to_model_input, load_preprocessor, resolve_checkpoint,
                            to_model_input)

    pil_images = [decode_image(j) for j in jpegs]
    pre, ref, dev = load_preprocessor(ckpt), resolve_checkpoint(ckpt), torch.device(device)
    cpu_pixels = pre(pil_images)
    expected = torch.from_numpy(cpu_pixels)
    on_device = to_model_input(pre.to_uint8(pil_images), pre, dev)
    out = {"splits_exactly": pre.splits_exactly(), "pixels_equal": bool(torch.equal(on_device.cpu(), expected)),
           "pixels_max_abs_diff": float((on_device.cpu() - expected).abs().max())}
    cpu = Scorer(ref, device="cpu", dtype="fp32").score(cpu_pixels)
    out["bf16"] = _agreement(Scorer(ref, device=device, dtype="bf16").score(on_device), cpu)
    fp32 = Scorer(ref, device=device, dtype="fp32")  # kept for the device-decode checks
    out["fp32"] = _agreement(fp32.score(on_device), cpu)
    try:  # its own failure must not cost the figures above (one device call is all there is)
        decoded, refused = jpegs_to_model_input(jpegs, pre, dev)
        std = torch.tensor(_std(pre)).view(1, -1, 1, 1)  # per channel: back to 8-bit levels
        levels = (decoded.cpu() - expected).abs() * 255 * std
        out["device_decode"] = {"refused": len(refused), "mean_level_diff": float(levels.mean()),
                                "max_level_diff": float(levels.max()), **_agreement(fp32.score(decoded), cpu),
                                "img_per_s": _decode_rate(jpegs, pre, dev),
                                "two_threads": _two_threads(jpegs, pre, fp32, dev)}
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        logger.exception("device decode failed")
        out["device_decode"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


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
        for name in args.model:
            results[name] = check_model(str(_checkpoint(name, Path(tmp))), jpegs, args.device)
            logger.info("%s: %s", name, json.dumps(results[name]))
            if args.out:  # after each model: a time limit that stops the next keeps this one's
                Path(args.out).write_text(json.dumps(results, indent=2))
    exact = all(r["pixels_equal"] for r in results.values())
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
