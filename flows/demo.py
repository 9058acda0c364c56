"""``score-images demo``: the main job on an embedded default, offline.

Generates sample images (including a few broken ones, to show error rows),
scores them with the default model through the real flow (local Ray,
ephemeral Prefect, local Parquet) and prints where the output is and what it
holds. When the hub is unreachable it says so and falls back to a randomly
initialised checkpoint of the same architecture; only the demo does this.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks.settings import DEFAULT_MODEL

logger = logging.getLogger(__name__)


def generate_sample_images(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` varied images plus three broken files; return their paths."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = int(rng.integers(160, 900)), int(rng.integers(160, 700))
        img = Image.fromarray(_gradient(rng, w, h))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=fill)
        fmt, mode = [("jpg", "RGB"), ("png", "RGB"), ("png", "L"), ("png", "RGBA"), ("webp", "RGB")][i % 5]
        path = directory / f"sample-{i:03d}.{fmt}"
        img.convert(mode).save(path)
        paths.append(path)
    good = paths[0].read_bytes()
    broken = {"truncated.jpg": good[: len(good) // 3], "empty.jpg": b"", "not-an-image.png": b"hello"}
    for name, data in broken.items():
        (directory / name).write_bytes(data)
        paths.append(directory / name)
    return paths


def _gradient(rng, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, 3)
    out = np.stack([(base[c] + xx * (c + 1) // 3 + yy // (c + 1)) % 256 for c in range(3)], axis=-1)
    return out.astype(np.uint8)


def demo_model() -> str:
    """The default model if the hub answers, else a cached random-weight copy of it."""
    from deit_model import create_random_checkpoint
    from deit_model.loading import cache_root, resolve_checkpoint

    try:
        return resolve_checkpoint(DEFAULT_MODEL).source  # cached or downloadable
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        reason = str(exc)
    print(f"NOTE: cannot use {DEFAULT_MODEL} ({reason.split(';')[0]}).\n"
          f"NOTE: falling back to a RANDOMLY INITIALISED checkpoint with the same architecture "
          f"and preprocessing; its labels mean nothing.", flush=True)
    # the directory name becomes the output's model name: make it say "random"
    target = cache_root() / "random-checkpoints" / ("random-" + DEFAULT_MODEL.replace("/", "--"))
    if not (target / "model.safetensors").exists():
        create_random_checkpoint(DEFAULT_MODEL, target)
    return str(target)


def run_demo(output: str = "demo-output", num_images: int = 24) -> int:
    """Generate images, run the flow on them, show what was written."""
    from .cli import UsageError, run_flow

    out = Path(output).resolve()
    if out.is_file():
        raise UsageError(f"output {output} is a file; --output names a folder for the demo's images and dataset")
    images = out / "sample-images"
    if not images.exists():  # generated once: a second demo run shows the incremental skip
        # into a temporary folder first, so an interrupted generation is not taken for a whole one
        partial = out / "sample-images.partial"
        shutil.rmtree(partial, ignore_errors=True)
        generate_sample_images(partial, num_images)
        partial.rename(images)
    elif (held := len(list(images.glob("sample-*")))) != num_images:
        logger.warning("%s already holds %d sample images; scoring those (--num-images applies to a new "
                       "--output)", images, held)
    # the layout and batch size left to the run: one actor per core, each decoding its own images, on any machine
    params = {"input": str(images), "output": str(out), "model": demo_model()}
    code = run_flow(params)
    if code == 0:
        _show(out)
    return code


def _show(out: Path) -> None:
    import pyarrow.dataset as ds

    preds = ds.dataset(out / "predictions", partitioning="hive").to_table(
        columns=["uri", "labels", "scores", "embedding"])
    errs = ds.dataset(out / "errors", partitioning="hive").to_table(columns=["uri", "error_type"])
    print(f"\nthe dataset holds {preds.num_rows} predictions and {errs.num_rows} errors; first rows:")
    for row in preds.slice(0, 3).to_pylist():
        print(f"  {os.path.basename(row['uri'])}: {row['labels'][0]!r} {row['scores'][0]:.4f} "
              f"(embedding of {len(row['embedding'])} floats)")
    for row in errs.to_pylist():
        print(f"  {os.path.basename(row['uri'])}: {row['error_type']}")
