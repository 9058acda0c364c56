"""Preprocessing, read from the checkpoint and run exactly as its library runs it.

* transformers checkpoints: ``AutoImageProcessor.from_pretrained`` (in
  transformers 5 the torchvision-backed processor), from
  ``preprocessor_config.json``;
* timm checkpoints: ``create_transform(**resolve_data_config(...))`` from the
  checkpoint's ``pretrained_cfg``.

Preprocessors are plain picklable objects, so the pipeline ships them to its
CPU decode workers.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from . import hf_steps
from .loading import ModelLoadError
from .model import inspect_checkpoint

logger = logging.getLogger(__name__)


class Preprocessor:
    """RGB PIL images -> float32 array (N, 3, H, W).

    The steps also run in two halves, for GPU actors: :meth:`to_uint8` (resize,
    crop: pixels stay 8-bit) where images are decoded, :meth:`normalize`
    (rescale, normalise) on the model's device. The uint8 half is a quarter of
    the float32 bytes through Ray's object store and the host-to-device copy.
    The halves are used only where :meth:`splits_exactly` says that together
    they give ``__call__``'s output bit for bit.
    """

    def __call__(self, images: Sequence) -> np.ndarray:
        raise NotImplementedError

    def to_uint8(self, images: Sequence) -> np.ndarray:
        """The geometric steps only: uint8 (N, 3, H, W), for :meth:`normalize` to finish."""
        raise NotImplementedError

    def normalize(self, x):
        """The value steps on a uint8 tensor from :meth:`to_uint8`, on its device: float32 pixels.

        Each output is looked up in a table of every channel's 256 values, which the library's
        own steps (:meth:`_value_steps`) computed on the CPU, so every device gives the CPU's
        bits. Run on a GPU, the steps themselves need not: torch divides by a Python number
        there as a multiplication by its reciprocal, and timm's ``/ 255`` came out one unit in
        the last place off on an H200 (benchmarks/gpu_check.py, 2026-12-04). The table holds
        only where the steps act on each value alone, per channel, which
        :meth:`splits_exactly` checks through this method.
        """
        import torch

        if x.dtype != torch.uint8:  # no 8-bit values to look up: the steps themselves
            return self._value_steps(x)
        tables, key = self.__dict__.setdefault("_tables", {}), (x.device, x.shape[1])
        if key not in tables:  # per device; GPU actors build theirs before their call threads start
            offsets = torch.arange(x.shape[1], dtype=torch.int64).view(1, -1, 1, 1) * 256  # each channel's row
            tables[key] = _value_table(self, x.shape[1]).to(x.device), offsets.to(x.device)
        table, offsets = tables[key]
        return table[x.to(torch.int64).add_(offsets)]  # int64: indexing would convert an int32 index again

    def _value_steps(self, x):
        """The library's value steps (rescale, normalise) on a uint8 CPU tensor (N, C, H, W)."""
        raise NotImplementedError

    # kept out of the pickles that ship this object to Ray's workers: the device tables stay where
    # they were built (a decode worker needs none, and CUDA tensors must not travel), and the
    # checks of :meth:`known` are facts of this process's libraries
    _LOCAL = ("_tables", "_cpu_jpeg_exact", "_steps_exact")

    def known(self, key: str, find) -> bool:
        """``find()``, found once per object and process (``key``: one of ``_LOCAL``, never pickled)."""
        state = self.__dict__
        if state.get(key) is None:
            state[key] = find()
        return state[key]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}

    def geometry(self, images: Sequence):
        """:meth:`to_uint8` for uint8 (3, H, W) tensors, on their device (``--device-decode``).

        The same steps from the same configuration; for transformers' torchvision backend the
        same code as on PIL images, for timm torchvision's tensor resize (not PIL's).
        """
        raise NotImplementedError

    def splits_exactly(self) -> bool:
        """Whether ``normalize(to_uint8(images))`` equals ``__call__(images)`` exactly (checked once)."""
        if getattr(self, "_splits", None) is None:
            self._splits = _check_split(self)
        return self._splits

    def channels_last_steps(self) -> bool:
        """Whether the library's steps run on channels-last batches here (transformers', hf_steps.py)."""
        return False

    def to_dict(self) -> dict:
        """The preprocessing configuration, for the output's lineage."""
        raise NotImplementedError

    def min_decode_side(self) -> int:
        """Smallest side an image may be decoded to without the resize step upsampling it."""
        raise NotImplementedError

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) that the resize step makes of an image this size, before any crop.

        A shortest-edge resize makes a thin image huge (1 x 4,000 under timm's 248: 248 x 992,000
        pixels); decode checks this against ``--max-pixels`` before it runs.
        """
        rule, value = self._resize()
        if rule == "shortest_edge":
            scale = value / max(min(width, height), 1)
            return max(round(width * scale), value), max(round(height * scale), value)
        return value if rule == "fixed" else (width, height)

    def _resize(self) -> tuple[str | None, Any]:
        """The resize step: ("shortest_edge", side), ("fixed", (width, height)) or (None, None)."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the output, found by running once on a blank image (then kept on this object)."""
        shape = getattr(self, "_input_shape", None)
        if shape is None:
            from PIL import Image

            shape = self._input_shape = tuple(self([Image.new("RGB", (32, 32))]).shape[1:])
        return shape


class HFPreprocessor(Preprocessor):
    """A transformers image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images: Sequence) -> np.ndarray:
        if not images:
            return np.zeros((0, *self.input_shape()), dtype=np.float32)
        out = self._steps(images, values=True)
        return self._library(images) if out is None else out.numpy()

    def to_uint8(self, images: Sequence) -> np.ndarray:
        out = self._steps(images, values=False)
        return self._library_uint8(images) if out is None else out.numpy()

    def channels_last_steps(self) -> bool:
        """Whether the processor's steps run on channels-last batches here (hf_steps.py) instead of its call."""
        # they help only where the processor's call copies each image contiguous (transformers 5.24+);
        # 5.17's keeps the channels-last view and is faster itself (1.79 against 1.96 ms to uint8)
        return self._convert is hf_steps.planar_tensors and hf_steps.exact_for(self, self._library, self._library_uint8)

    def _steps(self, images: Sequence, values: bool):
        """:func:`hf_steps.run` where :meth:`channels_last_steps`; else None."""
        return hf_steps.run(self.processor, images, values) if self.channels_last_steps() else None

    def _library(self, images: Sequence) -> np.ndarray:
        out = self.processor(**self._inputs(images), return_tensors="pt")["pixel_values"]
        return out.numpy().astype(np.float32, copy=False)

    def _library_uint8(self, images: Sequence) -> np.ndarray:
        return self.geometry(images).numpy()

    def geometry(self, images: Sequence):
        # the processor's own resize and crop, with its value steps switched off; it turns PIL
        # images into tensors first, so tensors take the same path
        return self.processor(**self._inputs(images), do_rescale=False, do_normalize=False,
                              return_tensors="pt")["pixel_values"]

    def _inputs(self, images: Sequence) -> dict:
        """The processor's image arguments: PIL images as the uint8 tensors it would make of them."""
        convert = self._convert
        if convert is None:
            return {"images": list(images)}
        return {"images": convert(images), "input_data_format": "channels_first"}

    @functools.cached_property
    def _convert(self):
        """How PIL images become tensors here, faster than in the processor (None: not at all).

        The torchvision backend turns a PIL image into a (3, H, W) tensor before anything
        else, and its versions differ: transformers 5.17 keeps numpy's (H, W, 3) memory
        (a channels-last view, which its uint8 resize takes without a copy); 5.24 makes every
        input contiguous, by a strided copy that is slow (0.6 ms of a core for a 500x375 image).
        Whichever this processor does, it is handed that tensor ready-made (the view,
        :func:`~.hf_steps.channels_last_views`, or the contiguous one built fast from PIL's channel
        planes, :func:`~.hf_steps.planar_tensors`), so it skips the step: the same pixels bit for bit
        (tests/test_scorer.py), 1.34x faster to uint8 with 5.24 (docs/models.md).
        """
        import torch

        view = torch.zeros((2, 3, 3), dtype=torch.uint8).permute(2, 0, 1)  # (3, 2, 3), channels last
        try:
            kept = not self.processor.process_image(view, input_data_format="channels_first").is_contiguous()
        except Exception:  # noqa: BLE001 - another backend: it gets the PIL images themselves
            logger.debug("processor has no torchvision process_image", exc_info=True)
            return None
        return hf_steps.channels_last_views if kept else hf_steps.planar_tensors

    def _value_steps(self, x):
        p = self.processor  # the torchvision backend's fused rescale-and-normalise, as __call__ runs it
        return p.rescale_and_normalize(x, p.do_rescale, p.rescale_factor, p.do_normalize, p.image_mean, p.image_std)

    def to_dict(self) -> dict:
        return {"library": "transformers", "class": type(self.processor).__name__, **self.processor.to_dict()}

    def _resize(self) -> tuple[str | None, Any]:
        size = dict(getattr(self.processor, "size", None) or {})
        if size.get("shortest_edge"):
            return "shortest_edge", size["shortest_edge"]
        return ("fixed", (size["width"], size["height"])) if size.get("height") and size.get("width") else (None, None)

    def min_decode_side(self) -> int:
        size = dict(getattr(self.processor, "size", None) or {})
        sides = [size[k] for k in ("height", "width", "shortest_edge") if size.get(k)]
        if not sides:  # no resize step: decoded size is what the model sees
            crop = dict(getattr(self.processor, "crop_size", None) or {})
            sides = [crop.get("height", 0), crop.get("width", 0)]
        return int(max(sides))


def _check_split(pre: Preprocessor) -> bool:
    """Run both ways on probe images (odd sizes, up- and downscaled); any difference means no split."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((61, 47), (333, 517))]
    try:
        half = pre.to_uint8(probes)
        whole = pre(probes)
        split = pre.normalize(torch.from_numpy(half)).numpy()
    except Exception:  # noqa: BLE001 - a processor without the halves is used whole
        logger.debug("preprocessing does not split", exc_info=True)
        return False
    return half.dtype == np.uint8 and split.shape == whole.shape and bool(np.array_equal(split, whole))


def _value_table(pre: Preprocessor, channels: int):
    """float32 (channels * 256,): the value steps' output for each channel and 8-bit value, from the CPU."""
    import torch

    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, channels, 1, 256).contiguous()
    values = pre._value_steps(ramp)
    if tuple(values.shape) != (1, channels, 1, 256) or values.dtype != torch.float32:
        raise ValueError(f"value steps gave {values.dtype} {tuple(values.shape)} for a (1, {channels}, 1, 256) "
                         "uint8 ramp: not a per-value map")
    return values.reshape(-1).contiguous()


def to_model_input(pixels: np.ndarray, preprocessor: Preprocessor, device):
    """Decoded pixels as a float32 tensor on ``device``: uint8 ones are normalised there.

    uint8 pixels travel to a GPU from page-locked memory (an asynchronous
    copy, so the normalisation is queued behind it without waiting).
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels))
    if x.dtype != torch.uint8:
        return x
    if device.type == "cuda":
        x = x.pin_memory()
    return preprocessor.normalize(x.to(device, non_blocking=True))


def check_preprocessing(local_dir: str) -> None:
    """Fail (ModelLoadError) if the checkpoint's preprocessing config is missing or not JSON.

    Reads the file only, without importing torch or transformers, so a command
    can refuse a broken checkpoint before it starts anything. What the file
    says is applied (and checked) by :func:`load_preprocessor` where images
    are decoded.
    """
    if inspect_checkpoint(local_dir).backend == "timm":
        return  # timm's data config is part of config.json, which inspect_checkpoint read
    path = os.path.join(local_dir, "preprocessor_config.json")
    try:
        with open(path) as fh:
            if not isinstance(json.load(fh), dict):
                raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read preprocessing from {local_dir!r}: {exc}") from exc


def create_preprocessor(model: str, revision: str | None = None, storage_options: dict | None = None) -> Preprocessor:
    """Resolve ``model`` (as :func:`~deit_model.create_scorer` does) and load its preprocessing."""
    from .loading import resolve_checkpoint

    # the configuration only: no need to hash the weights for a revision
    return load_preprocessor(resolve_checkpoint(model, revision, storage_options, identify=False).local_dir)


def load_preprocessor(local_dir: str) -> Preprocessor:
    """The checkpoint's own preprocessing."""
    if inspect_checkpoint(local_dir).backend == "timm":
        from .timm_backend import TimmPreprocessor, data_config

        return TimmPreprocessor(data_config(local_dir))
    from transformers import AutoImageProcessor

    try:
        return HFPreprocessor(AutoImageProcessor.from_pretrained(local_dir))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read preprocessing from {local_dir!r}: {exc}") from exc
