"""transformers' torchvision preprocessing, its own steps run on channels-last batches.

A transformers 5 image processor (``TorchvisionBackend``) turns each image into a
(3, H, W) tensor, stacks images of one size and runs its steps on the stack: resize,
centre crop, fused rescale-and-normalise. transformers 5.24 and later make each image
contiguous first, a strided copy of the whole decoded image (0.3 ms of a core for
500x375), and its stack of planar images then sends torch's uint8 antialiased resize
down its slower planar path: 1.2 ms an image in all, against 0.5 ms for the same steps
on a channels-last stack, which is the layout the decoders return
(docs/models.md, "transformers' steps on channels-last batches").

:func:`run` calls the processor's own public steps, with the processor's own settings,
in the order of its generic ``_preprocess``, on channels-last stacks. It is used only
where the processor's call would copy each image (``HFPreprocessor.channels_last_steps``:
transformers 5.17 keeps the view, and its own call is faster there), only for a
processor whose class keeps that generic orchestration and has no padding step,
and only where :func:`exact_for` found it gives the processor's own output bit for bit
on probe images of mixed sizes, both the float32 input and the uint8 half.
``DEIT_PREPROCESS=library`` turns it off. Anything it does not take (an image that is
not an RGB PIL image or a uint8 (3, H, W) tensor) goes through the processor itself.

Where the processor's own call runs, :func:`planar_tensors` or :func:`channels_last_views`
hand it PIL images as the tensors it would make of them, faster than it does
(``HFPreprocessor._convert`` chooses which).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

ENV = "DEIT_PREPROCESS"  # "library": the processor's own call always; unset or "auto": run() where exact


def usable(processor) -> bool:
    """Whether ``processor`` runs the generic torchvision steps that :func:`run` repeats."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # another transformers layout: the processor's own call
        return False
    cls = type(processor)
    return (isinstance(processor, TorchvisionBackend)
            and cls._preprocess is TorchvisionBackend._preprocess
            and cls._preprocess_image_like_inputs is TorchvisionBackend._preprocess_image_like_inputs
            and not getattr(processor, "do_pad", None))


def run(processor, images: Sequence, values: bool = True):
    """The processor's output for ``images``: float32 (N, 3, h, w), or uint8 without the value steps.

    Returns None where an image is not one this path takes.
    """
    import torch

    hwc = [_hwc(img) for img in images]
    if any(x is None for x in hwc):
        return None
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(hwc):
        groups.setdefault(tuple(x.shape), []).append(i)
    out = None
    for idx in groups.values():
        # stacked (n, H, W, 3) and seen as (n, 3, H, W): the channels-last batch, one copy
        batch = _steps(processor, torch.stack([hwc[i] for i in idx]).permute(0, 3, 1, 2), values)
        if len(groups) == 1:  # one size, as in most datasets: no copy into a batch of mixed sizes
            return batch
        if out is None:
            out = batch.new_empty((len(hwc), *batch.shape[1:]))
        elif batch.shape[1:] != out.shape[1:]:  # sizes the processor cannot stack either: its own error
            return None
        out[idx] = batch
    return out


def _steps(p, batch, values: bool):
    """The generic ``_preprocess``'s steps on one channels-last stack, with the processor's settings."""
    if p.do_resize:
        # the resized stack is small (256x256 for DeiT): planar from here, as the processor's is
        batch = p.resize(image=batch, size=p.size, resample=p.resample).contiguous()
    if p.do_center_crop:
        batch = p.center_crop(batch, p.crop_size)
    if values:
        batch = p.rescale_and_normalize(batch, p.do_rescale, p.rescale_factor, p.do_normalize,
                                        p.image_mean, p.image_std)
    return batch.contiguous()


def _hwc(img):
    """An RGB image as a uint8 (H, W, 3) tensor (a view where it can be), or None."""
    import torch
    from PIL import Image

    if isinstance(img, Image.Image):
        return torch.from_numpy(np.array(img)) if img.mode == "RGB" else None  # writable, as torch wants
    if isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3:
        return img.permute(1, 2, 0)
    return None


def planar_tensors(images: Sequence) -> list:
    """RGB PIL images as contiguous uint8 (3, H, W) tensors, each channel plane copied whole."""
    import torch

    def planes(img):
        # PIL's raw encoder extracts one band straight to bytes: 0.34 ms for 500x375 against
        # 0.55 through Image.split (a band image each, then its bytes)
        out = np.empty((3, img.height, img.width), dtype=np.uint8)
        for c, band in enumerate("RGB"):
            out[c] = np.frombuffer(img.tobytes("raw", band), dtype=np.uint8).reshape(img.height, img.width)
        return torch.from_numpy(out)

    return _rgb_to_tensors(images, planes)


def channels_last_views(images: Sequence) -> list:
    """RGB PIL images as uint8 (3, H, W) views of their (H, W, 3) arrays (no copy beyond PIL's)."""
    return _rgb_to_tensors(images, lambda img: _hwc(img).permute(2, 0, 1))


def _rgb_to_tensors(images: Sequence, convert) -> list:
    from PIL import Image

    return [convert(img) if isinstance(img, Image.Image) and img.mode == "RGB" else img for img in images]


def exact_for(preprocessor, library_call, library_uint8) -> bool:
    """Whether :func:`run` gives ``preprocessor`` the library's own output (checked once per object).

    ``library_call`` and ``library_uint8`` run the processor itself, whole and without its value steps.
    """
    if os.environ.get(ENV, "auto").lower() == "library":
        return False
    return preprocessor.known("_steps_exact", lambda: usable(preprocessor.processor)
                              and _check(preprocessor, library_call, library_uint8))


def _check(preprocessor, library_call, library_uint8) -> bool:
    """Probe images of mixed sizes (PIL images and channels-last tensors) both ways, both halves."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((375, 500), (61, 47), (375, 500),
                                                                          (517, 333), (256, 256), (224, 300))]
    pil = [Image.fromarray(a) for a in arrays]
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    p = preprocessor.processor
    try:
        same = all(np.array_equal(run(p, images).numpy(), library_call(reference)) and
                   np.array_equal(run(p, images, values=False).numpy(), library_uint8(reference))
                   for images, reference in ((pil, pil), (tensors, pil), (pil[1:2], pil[1:2])))
    except Exception:  # noqa: BLE001 - steps that take other arguments: the processor's own call
        logger.debug("processor's steps do not run on their own here", exc_info=True)
        return False
    if not same:
        logger.warning("%s's steps on channels-last batches differ from its own call here; it runs as it "
                       "is (slower, the same scores)", type(p).__name__)
    return same
