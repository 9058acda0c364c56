"""The CPU stage: read image bytes, decode, preprocess; failures become error rows.

Runs as a Ray task per batch, overlapping the scoring actors, or inside the
actors themselves (tasks/actor_pool.py). One unreadable or undecodable
object marks only its own row.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from typing import Any, Iterable, Iterator

import numpy as np

from deit_model import DecodeError, Preprocessor, decode_image, keep_freed_memory
from deit_model import cpu_jpeg
from deit_model import decode as image_decode
from deit_model.decode import PREPROCESS_ERROR, TOO_LARGE, device_jpeg_size

from . import storage
from .batch_reads import in_order, read_error_type, to_read_in

logger = logging.getLogger(__name__)

DECODE_TASK_MEMORY = 1024**3  # bytes per decode task: ~600 MiB is the worker with torch loaded


def decode_batch(
    batch: dict[str, np.ndarray], *, preprocessor: Preprocessor, max_pixels: int, fast_decode: bool,
    storage_options: dict[str, Any], uint8: bool = False, device_jpeg: bool = False,
    datas: list[bytes | OSError] | None = None, max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Add ``decoded``, ``pixel_values``, ``error_type`` and ``error_message`` to a plan batch.

    ``decoded`` is the one flag the scorer trusts: an all-None ``error_type``
    column comes back from Arrow as NaN, not None. With ``uint8``, pixels
    stop before the value steps (:meth:`Preprocessor.to_uint8`) where that is
    exact, and the scorer finishes them on its device. With ``device_jpeg``
    (which implies ``uint8``) the JPEGs :func:`device_decodable` accepts are
    not decoded here: their bytes, packed into ``jpeg_data`` and
    ``jpeg_offsets`` (:func:`jpeg_of`), their pixel counts (``jpeg_pixels``,
    by which the device decodes them in chunks), and a per-row object column
    ``pixels`` (the others' uint8 pixels) replace ``pixel_values``, and
    :func:`device_model_input` finishes them on the scorer's device. ``datas``: the rows'
    bytes, already read by :func:`read_batch`; else they are read here, all but those whose
    listed ``source_size`` is over ``max_bytes``.
    """
    if device_jpeg and not preprocessor.splits_exactly():
        _warn_once("--device-decode needs the preprocessing in two exact halves, and this checkpoint's "
                   "does not split: its images are decoded by PIL instead")
        device_jpeg = False
    half = (uint8 or device_jpeg) and preprocessor.splits_exactly()
    draft_side = preprocessor.min_decode_side() if fast_decode else None
    uris = [str(u) for u in batch["uri"]]
    errors: list[tuple[str, str] | None] = [None] * len(uris)
    jpeg: dict[int, tuple[bytes, tuple[int, int]]] = {}
    skip, to_read = to_read_in(batch, max_bytes) if datas is None else ({}, uris)
    with storage.ReadStream(to_read, storage_options) if datas is None else contextlib.nullcontext(datas) as stream:
        on_cpu = _sort(in_order(stream, skip, len(uris)), errors, jpeg, preprocessor, max_pixels, device_jpeg)
        rows, dense = decode_on_cpu(on_cpu, errors, preprocessor, half, max_pixels, draft_side)
    out = dict(batch)
    n = len(uris)
    if device_jpeg:
        out.update(_pack(jpeg, n))
        out["pixels"] = np.full(n, None, dtype=object)
        for j, i in enumerate(rows):
            out["pixels"][i] = dense[j] if errors[i] is None else None
    elif len(rows) == n:  # the usual batch: every row decoded, in order
        out["pixel_values"] = dense
    else:
        out["pixel_values"] = np.zeros((n, *dense.shape[1:]), dtype=dense.dtype)
        out["pixel_values"][rows] = dense
    out["decoded"] = np.array([e is None for e in errors], dtype=bool)
    out["error_type"] = np.array([e[0] if e else None for e in errors], dtype=object)
    out["error_message"] = np.array([e[1] if e else None for e in errors], dtype=object)
    return out


def _sort(datas: Iterable[bytes | OSError], errors: list, jpeg: dict, preprocessor: Preprocessor,
          max_pixels: int, device_jpeg: bool) -> Iterator[tuple[int, bytes]]:
    """Rows' read results as they arrive: the rows decoded here, ``(row, bytes)``, one by one.

    A read failure goes into ``errors``; a row for the device into ``jpeg`` as
    ``{row: (bytes, (width, height))}``, the size read from the headers.
    """
    fits = _fits(preprocessor, max_pixels)
    for i, data in enumerate(datas):
        if isinstance(data, OSError):
            errors[i] = (read_error_type(data), str(data))
        elif device_jpeg and (size := device_jpeg_size(data, max_pixels, fits=fits)):
            jpeg[i] = (data, size)
        else:
            yield i, data


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _pack(jpeg: dict[int, tuple[bytes, tuple[int, int]]], n: int) -> dict[str, np.ndarray]:
    """Rows' JPEG bytes as one uint8 buffer, n + 1 offsets and each row's decoded pixel count
    (0 where PIL decodes it): Ray hands numpy buffers to the actor without a copy, where an
    object per image is unpickled (0.108 ms per image)."""
    lengths = [len(jpeg[i][0]) if i in jpeg else 0 for i in range(n)]
    data = b"".join(jpeg[i][0] for i in sorted(jpeg))
    return {"jpeg_data": np.frombuffer(data, dtype=np.uint8),
            "jpeg_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "jpeg_pixels": np.array([w * h for w, h in (jpeg[i][1] if i in jpeg else (0, 0) for i in range(n))],
                                    dtype=np.int64)}


def jpeg_of(batch: dict[str, np.ndarray], i: int) -> np.ndarray | None:
    """Row ``i``'s JPEG bytes (a uint8 view) in a ``device_jpeg`` batch; None where PIL decoded the row."""
    lo, hi = batch["jpeg_offsets"][i], batch["jpeg_offsets"][i + 1]
    return batch["jpeg_data"][lo:hi] if hi > lo else None


def decode_on_cpu(datas: Iterable[tuple[int, bytes]], errors: list, preprocessor: Preprocessor, uint8: bool,
                  max_pixels: int, draft_side: int | None) -> tuple[list[int], np.ndarray]:
    """Decode and preprocess rows' bytes: (the decoded rows, their pixels in that order).

    A row that fails gets its error in ``errors`` (and zero pixels if its preprocessing failed).
    Images are preprocessed in chunks of at most ``CHUNK_PIXELS`` decoded pixels (deit_model.decode), so a batch
    of phone photos never holds all its full-size images at once; a batch of small images is
    one chunk, whose pixels come back as the preprocessing made them (no copy). Plain JPEGs
    are decoded by torchvision where that gives this preprocessing PIL's pixels
    (deit_model.cpu_jpeg), the rest by PIL.
    """
    preprocess, dtype = (preprocessor.to_uint8, np.uint8) if uint8 else (preprocessor, np.float32)
    # plain JPEGs go to torchvision where exact: its header check's size limit, made once per batch
    plain_fits = _fits(preprocessor, max_pixels) if draft_side is None and cpu_jpeg.exact_for(preprocessor) else None
    rows: list[int] = []
    parts: list[np.ndarray] = []
    chunk: dict[int, Any] = {}
    in_chunk = 0  # decoded pixels in ``chunk``
    for i, data in datas:
        try:
            image, (width, height) = _decode_one(data, preprocessor, max_pixels, draft_side, plain_fits)
        except DecodeError as exc:
            errors[i] = (exc.error_type, str(exc))
            continue
        if chunk and in_chunk + width * height > image_decode.CHUNK_PIXELS:
            parts.append(_preprocess_chunk(chunk, preprocess, errors, preprocessor, dtype))
            chunk, in_chunk = {}, 0  # the chunk's full-size images are freed here, before the next is decoded
        chunk[i] = image
        in_chunk += width * height
        rows.append(i)
    if chunk or not parts:
        parts.append(_preprocess_chunk(chunk, preprocess, errors, preprocessor, dtype))
    return rows, parts[0] if len(parts) == 1 else np.concatenate(parts)


def _decode_one(data: bytes, preprocessor: Preprocessor, max_pixels: int, draft_side: int | None,
                plain_fits) -> tuple[Any, tuple[int, int]]:
    """One image as (an RGB PIL image or uint8 (3, H, W) tensor, (width, height)), or a DecodeError.

    ``plain_fits``: None, or the size check under which a plain JPEG is torchvision's to decode.
    """
    if plain_fits and device_jpeg_size(data, max_pixels, fits=plain_fits):
        pixels = cpu_jpeg.decode_rgb(data)
        if pixels is not None:
            return pixels, (pixels.shape[2], pixels.shape[1])
    image = decode_image(data, max_pixels=max_pixels, draft_side=draft_side)
    overflow = resize_overflow(image.size, preprocessor, max_pixels)
    if overflow:
        raise DecodeError(TOO_LARGE, overflow)
    return image, image.size


def _preprocess_chunk(chunk: dict[int, Any], preprocess, errors: list, preprocessor: Preprocessor,
                      dtype) -> np.ndarray:
    shape = (len(chunk), *preprocessor.input_shape())
    return _preprocess(list(chunk.values()), list(chunk), preprocess, errors, shape, dtype)


def _fits(preprocessor: Preprocessor, max_pixels: int):
    """The header check's ``fits(width, height)``: one that does not is PIL's, to become its error row."""
    return lambda width, height: resize_overflow((width, height), preprocessor, max_pixels) is None


def resize_overflow(size: tuple[int, int], preprocessor: Preprocessor, max_pixels: int) -> str | None:
    """Why an image of ``size`` must not be resized (more than ``max_pixels`` before the crop), or None.

    A thin image (1 x 4,000, a few hundred bytes) is within any pixel limit, but a
    shortest-edge resize makes it 248 x 992,000 before the crop: gigabytes that would
    kill its process (and, after the crash isolation's bisection, cost many deaths).
    """
    width, height = preprocessor.resized_size(*size)
    if width * height <= max_pixels:
        return None
    return (f"{size[0]}x{size[1]} resizes to {width}x{height} = {width * height} pixels before the crop, "
            f"over the limit of {max_pixels}")


def _preprocess(images: list, rows: list[int], preprocess, errors: list, shape: tuple, dtype) -> np.ndarray:
    """``preprocess(images)`` as an array of ``shape``, the batch's own output as it is (no copy).

    If the batch fails, each image is preprocessed alone: one that fails gets zeros and the
    error of row ``rows[j]``.
    """
    if not images:
        return np.zeros(shape, dtype)
    try:
        pixels = np.asarray(preprocess(images), dtype=dtype)
        if pixels.shape == shape:
            return pixels
        raise ValueError(f"preprocessing made {pixels.shape}, not {shape}")
    except Exception:  # noqa: BLE001 - isolate the image that broke the batch
        logger.debug("batched preprocessing failed; retrying image by image", exc_info=True)
    pixels = np.zeros(shape, dtype)
    for j, (row, image) in enumerate(zip(rows, images)):
        try:
            pixels[j] = preprocess([image])[0]
        except Exception as exc:  # noqa: BLE001 - becomes this row's error
            errors[row] = (PREPROCESS_ERROR, f"{type(exc).__name__}: {exc}")
    return pixels


def decode_task_for(num_cpus: float, fn=None):
    """The Ray task that decodes one batch, with ``num_cpus`` CPUs: ``task.remote(batch, options)``.

    ``fn`` instead of the decode itself: a task of the same shape, which Ray runs in the
    same worker processes (:func:`warm_task_for`).
    """
    import ray

    # The memory reservation keeps Ray from packing too many decode tasks onto a node: a batch
    # of 12 MP photos holds hundreds of MB while decoding. A remote function, not an .options()
    # wrapper, so that a suspect batch's task can take options again (no retries).
    return ray.remote(num_cpus=num_cpus, memory=DECODE_TASK_MEMORY)(fn or _decode)


def warm_task_for(num_cpus: float):
    """A task shaped like :func:`decode_task_for`'s that readies its worker: ``task.remote(checkpoint)``.

    It imports the model libraries and loads the checkpoint's preprocessing (checking its
    split, and which JPEG decoder gives its pixels) into the worker's cache, which each decode
    worker otherwise does on its first batch.
    """
    return decode_task_for(num_cpus, _warm)


def _warm(checkpoint: tuple) -> int:
    """Ready this worker for decode tasks of ``checkpoint``; return its process id."""
    preprocessor = _preprocessor(*checkpoint)
    preprocessor.splits_exactly()
    cpu_jpeg.exact_for(preprocessor)
    return os.getpid()


def _decode(batch: dict, options: dict) -> dict:
    keep_freed_memory()  # a decode worker's batches reuse the last one's buffers too
    options = dict(options)
    preprocessor = _preprocessor(*options.pop("checkpoint"))
    return decode_batch(batch, preprocessor=preprocessor, **options)


@functools.lru_cache(maxsize=1)
def _preprocessor(model: str, revision: str | None, storage_options: str):  # the options as JSON: hashable
    # per decode worker process: read from the checkpoint once, as the actors do,
    # instead of the driver importing the model libraries to ship it
    from deit_model import create_preprocessor

    return create_preprocessor(model, revision, json.loads(storage_options))
