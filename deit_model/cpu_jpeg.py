"""Plain JPEGs decoded on the CPU by torchvision's libjpeg-turbo: PIL's pixels, sooner.

Pillow and torchvision each bundle a build of libjpeg-turbo, whose default
decode (the accurate integer IDCT, fancy chroma upsampling) is the same integer
arithmetic in every build and SIMD flavour. So the two decode a plain JPEG (what
:func:`~deit_model.decode.device_jpeg_size` accepts: baseline, 3-channel YCbCr,
upright, complete) to the same RGB pixels. torchvision hands them over as a uint8
(3, H, W) view of its (H, W, 3) buffer: the layout transformers 5.17's processor
takes as it is, and which 5.24 and later copy contiguous themselves, as they would
a PIL image's array (0.2 ms), instead of our copy of PIL's channel planes. For a
500x375 JPEG the decode is 1.21 ms of a core against 1.49 with PIL; the whole
decode stage costs 6 % less (docs/scale.md).

Whether that holds here is checked, not assumed: once per preprocessor, probe
JPEGs of several subsamplings, qualities and sizes are decoded both ways and
preprocessed (:func:`exact_for`); any difference in a pixel (logged as a warning) or
in the model input turns this path off for that preprocessor. ``DEIT_JPEG_DECODER=pil``
turns it off everywhere. Everything else (other formats, progressive, greyscale,
CMYK, rotated, truncated files, or an image torchvision refuses) is PIL's, so it
decodes, or fails with its error row, as it did before.
"""
from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np

logger = logging.getLogger(__name__)

ENV = "DEIT_JPEG_DECODER"  # "pil": PIL decodes every image; unset or "auto": this path where exact
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec's; the project pins
# torchvision < 0.30 (pyproject.toml), and the warning (one per call) says nothing to act on here
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def exact_for(preprocessor) -> bool:
    """Whether this path gives ``preprocessor`` the model input PIL's decode gives it (checked once per object)."""
    if os.environ.get(ENV, "auto").lower() == "pil":
        return False
    return preprocessor.known("_cpu_jpeg_exact", lambda: _check(preprocessor))


def decode_rgb(data: bytes):
    """A plain JPEG's pixels as a uint8 (3, H, W) channels-last view, or None where torchvision refuses it."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        # a writable copy (10 us for 110 KB): torch warns on a tensor over read-only bytes
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:  # PIL decodes it, or reports what is wrong with it
        logger.debug("torchvision refused a JPEG (%s); PIL decodes it", exc)
        return None


def probe_jpegs() -> list[bytes]:
    """JPEGs of each chroma subsampling, two qualities and odd sizes, from noise and from smooth gradients."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for h, w in ((47, 61), (375, 500), (333, 517)):
        ramp = np.add.outer(np.arange(h), np.arange(w)) % 256
        smooth = np.stack([ramp, ramp[::-1], (ramp * 3) % 256], axis=-1).astype(np.uint8)
        for pixels in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), smooth):
            for subsampling, quality in ((0, 95), (1, 75), (2, 90), (2, 50)):
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=subsampling)
                out.append(buf.getvalue())
    return out


def _check(preprocessor) -> bool:
    """Decode the probes both ways: the same pixels, then the same model input (both halves), or off."""
    from .decode import decode_image, device_jpeg_size

    probes = probe_jpegs()
    pil = [decode_image(p) for p in probes]
    tensors = [decode_rgb(p) if device_jpeg_size(p) else None for p in probes]
    if not all(t is not None and np.array_equal(np.asarray(img), t.permute(1, 2, 0).numpy())
               for img, t in zip(pil, tensors)):
        logger.warning("torchvision's libjpeg-turbo decodes the probe JPEGs differently from PIL's here (or "
                       "its image extension is missing); PIL decodes every image (slower, the same scores)")
        return False
    try:
        same = np.array_equal(preprocessor(pil), preprocessor(tensors))
        if same and preprocessor.splits_exactly():
            same = np.array_equal(preprocessor.to_uint8(pil), preprocessor.to_uint8(tensors))
    except Exception:  # noqa: BLE001 - a preprocessing that takes PIL images only
        logger.debug("preprocessing does not take decoded tensors", exc_info=True)
        return False
    if not same:  # timm's: a tensor is resized by torchvision's own resize, not PIL's
        logger.debug("preprocessing gives decoded tensors other pixels than PIL images; PIL decodes")
    return same
