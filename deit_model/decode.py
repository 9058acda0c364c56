"""Bytes to an RGB image, or a :class:`DecodeError` that says why not.

The references (transformers' image processors and timm's loader) turn every
image into RGB with ``Image.convert("RGB")``; we do the same so scores match,
after applying EXIF orientation. Only the modes where ``convert`` is wrong are
special-cased: 16/32-bit integer images, which PIL would clip instead of scale.
"""
from __future__ import annotations

import io
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own default: 2x its MAX_IMAGE_PIXELS, where it raises
# Decoded pixels preprocessed at once, on the CPU (tasks/decode.py) and on the device
# (device_decode.py): 256 small images (48 M pixels) are one chunk, 12 MP photos go 5 at a time
# (180 MB of RGB). Since scoring processes keep freed memory (host_memory.py), a batch's peak
# stays resident: 16 phone photos decoded at once kept 2.8 GB per actor.
CHUNK_PIXELS = 2**26

# Stable error_type values written to the errors table.
EMPTY = "empty_object"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt_image"
TOO_LARGE = "too_many_pixels"
TOO_MANY_BYTES = "too_many_bytes"  # larger as listed than the run's byte limit: not read at all
READ_ERROR = "read_error"
NOT_FOUND = "not_found"
PREPROCESS_ERROR = "preprocess_error"  # raised by the checkpoint's preprocessing, not by decoding


class DecodeError(Exception):
    """An image that cannot be scored; ``error_type`` is one of the constants above."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int | None = None) -> Image.Image:
    """Decode ``data`` to an RGB ``PIL.Image`` (first frame, EXIF-oriented).

    ``draft_side`` turns on fast decoding: JPEGs are decoded at a reduced scale
    (DCT-domain downscaling, ``Image.draft``) that keeps both sides at least
    ``draft_side`` pixels. This changes pixels; its agreement with exact
    decoding is measured in docs/models.md, not assumed.
    """
    if not data:
        raise DecodeError(EMPTY, "object is empty (0 bytes)")
    try:
        img = _open(data, max_pixels)
        width, height = img.size
        if width * height > max_pixels:
            raise DecodeError(
                TOO_LARGE, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        if draft_side and img.format == "JPEG":
            img.draft(img.mode, (draft_side, draft_side))
        img.load()  # decode now, so truncation is reported here
        source_format = img.format  # before EXIF orientation, which may leave an image without one
        # in place: otherwise an upright image (nearly all) is copied whole, 0.13 ms for 500x375
        ImageOps.exif_transpose(img, in_place=True)
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        # PIL's text names an in-memory buffer by its address, which means nothing in an
        # errors table and differs between runs; the object's first bytes say what it is
        raise DecodeError(NOT_AN_IMAGE, f"not a recognised image format ({len(data)} bytes, starting "
                                        f"{data[:8]!r})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(CORRUPT, f"cannot decode image: {exc}") from exc
    return to_rgb(img, source_format)


# Image.MAX_IMAGE_PIXELS and the warning filters are process-wide, and a GPU actor decodes on
# two threads: without the lock one thread's restore could land inside another's open
_OPEN_LOCK = threading.Lock()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` with PIL's own pixel limit lifted to ``max_pixels`` (headers only: cheap).

    PIL checks inside Image.open (warning past MAX_IMAGE_PIXELS, raising past
    twice that), before our own check can run: its limit follows ours for this
    call so a larger --max-pixels takes effect, and ours is reported instead of
    its warning.
    """
    with _OPEN_LOCK, warnings.catch_warnings(record=True) as seen:
        pil_limit, pil_warns = Image.MAX_IMAGE_PIXELS, Image.WARN_POSSIBLE_FORMATS
        Image.MAX_IMAGE_PIXELS, Image.WARN_POSSIBLE_FORMATS = max_pixels, True
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            if damaged := _damaged_header(str(w.message) for w in seen):
                raise DecodeError(CORRUPT, f"cannot decode image: {damaged}") from exc
            raise
        except Image.DecompressionBombError as exc:
            # PIL names its own limit, twice ours (it raises past 2x MAX_IMAGE_PIXELS)
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise DecodeError(TOO_LARGE, f"{pixels.group(1) if pixels else 'its'} pixels exceeds the limit of "
                                         f"{max_pixels}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS, Image.WARN_POSSIBLE_FORMATS = pil_limit, pil_warns


def _damaged_header(messages) -> str | None:
    """PIL's reason when a format recognised the first bytes as its own and then failed.

    Why: a PNG with a bad header checksum, a JPEG cut at 20 bytes, were "not a recognised
    image format" (found in review). Only formats that check the first bytes count: PIL
    tries the others (TGA, say) on anything, and their failure says nothing.
    """
    for message in messages:
        fmt, sep, reason = message.partition(" opening failed. ")
        if sep and Image.OPEN.get(fmt, (None, None))[1] is not None:
            return f"{fmt}: {reason}"
    return None


def to_rgb(img: Image.Image, source_format: str | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB as the references do, 16-bit greyscale scaled.

    ``source_format`` is the file's format (``img.format`` if not given).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or (img.mode == "I" and (source_format or img.format) == "PPM"):
        # 16-bit greyscale, which convert("RGB") would clip to 0..255 (almost all white):
        # scale 0..65535 instead. Pillow opens a 16-bit PGM as mode I, already rescaled from
        # its maxval to 0..65535. The scale is the file's, never the pixels' (a dark image
        # must not come out 257 times brighter than a bright one); any other mode I (32-bit
        # TIFF) has no known range and is converted as the references convert it.
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def device_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, fits=None) -> bool:
    """Whether a GPU's JPEG decoder may decode ``data`` in place of :func:`decode_image`.

    Only the plain case qualifies, read from the headers (about 40 us): a complete
    baseline 3-channel YCbCr JPEG, upright (EXIF orientation 1), within ``max_pixels``.
    Everything else (other formats, grayscale, CMYK, Adobe RGB-coded, progressive, rotated,
    truncated or broken files) goes through :func:`decode_image`, so it decodes, or fails
    with its error type, exactly as without a GPU decoder. So does one for which
    ``fits(width, height)`` is false (the caller's check of what its resize would make).
    """
    return device_jpeg_size(data, max_pixels, fits) is not None


def device_jpeg_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, fits=None) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that :func:`device_decodable` accepts, or None.

    The device decoder batches by this size (:data:`CHUNK_PIXELS`), read here from the
    headers that are open anyway, instead of opening them a second time.
    """
    if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or cut short: PIL reports truncation; a GPU decoder might not
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # headers only: nothing is decoded here
            width, height = img.size
            plain = (img.format == "JPEG" and img.mode == "RGB" and width * height <= max_pixels
                     and not img.info.get("progressive") and img.info.get("adobe_transform", 1) != 0
                     and img.getexif().get(0x0112, 1) == 1 and (fits is None or fits(width, height)))
    except Exception:  # noqa: BLE001 - unreadable headers: decode_image says why
        return None
    return (width, height) if plain else None
