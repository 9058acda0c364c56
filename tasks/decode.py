"""The CPU stage: read image bytes, decode, preprocess; failures become error rows.

Runs as a Ray task per batch, overlapping the scoring actors, or inside the
actors themselves (tasks/actor_pool.py). One unreadable or undecodable
object marks only its own row.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np

from deit_model import DecodeError, Preprocessor, decode_image
from deit_model.decode import NOT_FOUND, READ_ERROR

from . import storage

logger = logging.getLogger(__name__)

DECODE_TASK_MEMORY = 1024**3  # bytes per decode task: ~600 MiB is the worker with torch loaded


def decode_batch(
    batch: dict[str, np.ndarray], *, preprocessor: Preprocessor, max_pixels: int, fast_decode: bool,
    storage_options: dict[str, Any], uint8: bool = False,
) -> dict[str, np.ndarray]:
    """Add ``decoded``, ``pixel_values``, ``error_type`` and ``error_message`` to a plan batch.

    ``decoded`` is the one flag the scorer trusts: an all-None ``error_type``
    column comes back from Arrow as NaN, not None. With ``uint8``, pixels
    stop before the value steps (:meth:`Preprocessor.to_uint8`) where that is
    exact, and the scorer finishes them on its device.
    """
    draft_side = preprocessor.min_decode_side() if fast_decode else None
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    errors: list[tuple[str, str] | None] = [None] * n
    images: dict[int, Any] = {}
    for i, data in enumerate(_read(uris, storage_options)):
        if isinstance(data, OSError):
            kind = NOT_FOUND if isinstance(data, FileNotFoundError) else READ_ERROR
            errors[i] = (kind, str(data))
            continue
        try:
            images[i] = decode_image(data, max_pixels=max_pixels, draft_side=draft_side)
        except DecodeError as exc:
            errors[i] = (exc.error_type, str(exc))
    half = uint8 and preprocessor.splits_exactly()
    pixels = np.zeros((n, *_input_shape(preprocessor)), dtype=np.uint8 if half else np.float32)
    _preprocess_into(pixels, images, preprocessor.to_uint8 if half else preprocessor, errors)
    out = dict(batch)
    out["decoded"] = np.array([e is None for e in errors], dtype=bool)
    out["pixel_values"] = pixels
    out["error_type"] = np.array([e[0] if e else None for e in errors], dtype=object)
    out["error_message"] = np.array([e[1] if e else None for e in errors], dtype=object)
    return out


def _read(uris: list[str], storage_options: dict[str, Any]) -> list[bytes | OSError]:
    # All URIs of one run share a scheme, so one filesystem serves the batch.
    fs, _ = storage.filesystem(uris[0], storage_options)
    paths = [fs._strip_protocol(u) for u in uris]
    data = storage.read_many(fs, paths)
    return [data[p] for p in paths]


_SHAPES: dict[int, tuple] = {}  # per worker process: preprocessor -> output shape


def _input_shape(preprocessor: Preprocessor) -> tuple:
    key = id(preprocessor)
    if key not in _SHAPES:
        _SHAPES.clear()  # one preprocessor per run; do not grow across runs
        _SHAPES[key] = preprocessor.input_shape()
    return _SHAPES[key]


def _preprocess_into(pixels: np.ndarray, images: dict[int, Any], preprocess, errors: list) -> None:
    if not images:
        return
    idx = list(images)
    try:
        pixels[idx] = preprocess([images[i] for i in idx])
        return
    except Exception:  # noqa: BLE001 - isolate the image that broke the batch
        logger.debug("batched preprocessing failed; retrying image by image", exc_info=True)
    for i in idx:
        try:
            pixels[i] = preprocess([images[i]])[0]
        except Exception as exc:  # noqa: BLE001 - becomes this row's error
            errors[i] = ("preprocess_error", f"{type(exc).__name__}: {exc}")


def decode_task_for(num_cpus: float):
    """The Ray task that decodes one batch, with ``num_cpus`` CPUs: ``task.remote(batch, options)``."""
    import ray

    # The memory reservation keeps Ray from packing too many decode tasks onto a
    # node: a batch of 12 MP photos holds hundreds of MB while decoding.
    return ray.remote(_decode).options(num_cpus=num_cpus, memory=DECODE_TASK_MEMORY)


def _decode(batch: dict, options: dict) -> dict:
    options = dict(options)
    preprocessor = _preprocessor(*options.pop("checkpoint"))
    return decode_batch(batch, preprocessor=preprocessor, **options)


@functools.lru_cache(maxsize=1)
def _preprocessor(model: str, revision: str | None, storage_options: str):  # the options as JSON: hashable
    # per decode worker process: read from the checkpoint once, as the actors do,
    # instead of the driver importing the model libraries to ship it
    from deit_model import create_preprocessor

    return create_preprocessor(model, revision, json.loads(storage_options))
