"""JPEGs decoded on the model's device, for ``--device-decode``.

On CUDA, torchvision's batched ``decode_jpeg`` runs nvJPEG: decoding moves off the
CPU cores, which at a GPU's rate cannot keep up (docs/scale.md). Only JPEGs that
:func:`~deit_model.decode.device_decodable` accepts come here; the device's pixels
may differ from PIL's by a few levels (docs/agreement.md), which is why it is
opt-in. A JPEG the device decoder refuses is reported back, to be decoded by PIL.
"""
from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import torch

from . import decode
from .preprocess import Preprocessor

logger = logging.getLogger(__name__)

# The decoder only reads its input, which here is often a read-only view of Ray's object
# store: torch's warning about non-writable arrays says nothing to act on (this module only).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__.replace(".", r"\."))


def decode_jpegs(datas: Sequence[bytes | np.ndarray], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes (or uint8 arrays) -> uint8 (3, H, W) RGB tensors on ``device``; None where refused."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    if device.type == "cuda":
        # nvJPEG's hardware decoder writes its outputs without waiting for the caller's stream,
        # and the caching allocator hands it blocks freed on that stream whose queued kernels
        # may not have read them yet (pytorch/vision#9606, meta-pytorch/torchcodec#1634): what
        # is queued must finish first. Free when the stream is idle (Scorer.stream()).
        torch.cuda.current_stream(device).synchronize()
    raw = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8) if isinstance(d, bytes) else d) for d in datas]
    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the whole batched call: find it
        logger.debug("batched device decode failed; decoding one by one", exc_info=True)
    out: list[torch.Tensor | None] = []
    for r in raw:
        try:
            out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            logger.info("device JPEG decoder refused an image (%s); PIL decodes it", exc)
            out.append(None)
    return out


def jpegs_to_model_input(datas: Sequence[bytes | np.ndarray], preprocessor: Preprocessor, device: torch.device,
                         pixels: Sequence[int] | None = None) -> tuple[torch.Tensor | None, list[int]]:
    """Decode and preprocess JPEGs on ``device``: (float32 model input, indices of refused images).

    The input has a row per decoded image, in order, or is None when none decoded. With
    ``pixels`` (each JPEG's width x height, from :func:`~deit_model.decode.device_jpeg_size`)
    the JPEGs are decoded in chunks of at most :data:`~deit_model.decode.CHUNK_PIXELS`, as on
    the CPU: 128 phone photos at once would hold 4.6 GB of pixels, and many times that while
    they are resized; a batch of small images is one chunk.
    """
    refused: list[int] = []
    parts: list[torch.Tensor] = []
    for lo, hi in _chunks(pixels, len(datas)):
        decoded = decode_jpegs(datas[lo:hi], device)
        refused += [lo + i for i, t in enumerate(decoded) if t is None]
        good = [t for t in decoded if t is not None]
        if good:  # the chunk's full-size pixels are freed when the next chunk is decoded
            parts.append(preprocessor.normalize(preprocessor.geometry(good)))
    if not parts:
        return None, refused
    return parts[0] if len(parts) == 1 else torch.cat(parts), refused


def _chunks(pixels: Sequence[int] | None, n: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` index ranges whose pixels sum to at most CHUNK_PIXELS (one image at least)."""
    if pixels is None:
        return [(0, n)]
    bounds, lo, total = [], 0, 0
    for i, p in enumerate(pixels):
        if i > lo and total + p > decode.CHUNK_PIXELS:
            bounds.append((lo, i))
            lo, total = i, 0
        total += p
    return bounds + [(lo, n)] if n else []
