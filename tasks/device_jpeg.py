"""The scoring actor's side of ``--device-decode``: a batch's JPEGs decoded on its device.

The decode stage (tasks/decode.py) sends the JPEGs it may decode on the device
as bytes (``jpeg_data``, read with :func:`~tasks.decode.jpeg_of`) and every other
row's uint8 pixels; here they become one float32 model input on the device.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from deit_model import Preprocessor

from .decode import decode_on_cpu, jpeg_of


def device_model_input(batch: dict[str, np.ndarray], preprocessor: Preprocessor, device) -> tuple[dict, Any]:
    """The model input of a ``device_jpeg`` batch, on ``device``, and the batch with its final errors.

    Its JPEGs are decoded and preprocessed on the device, its other rows'
    uint8 pixels normalised there; an image the device decoder refuses is
    decoded by PIL here instead, and an error row if PIL fails too. Returns
    ``(batch, x)``: x holds one row per ``batch["decoded"]`` row, in order
    (None when there is none).
    """
    import torch

    from deit_model import jpegs_to_model_input, to_model_input

    ok = np.asarray(batch["decoded"], dtype=bool)
    pixels = batch["pixels"].copy()
    jpegs = {i: j for i in np.flatnonzero(ok) if (j := jpeg_of(batch, i)) is not None}
    on_device = list(jpegs)
    x_dev, refused = jpegs_to_model_input(list(jpegs.values()), preprocessor, device,
                                          pixels=[int(batch["jpeg_pixels"][i]) for i in jpegs])
    if refused:
        gone = {on_device[j] for j in refused}
        batch = _decode_refused(batch, pixels, {i: jpegs[i].tobytes() for i in sorted(gone)}, preprocessor)
        ok = batch["decoded"]
        on_device = [i for i in on_device if i not in gone]
    rows = np.flatnonzero(ok)
    if not len(rows):
        return batch, None
    if len(on_device) == len(rows):  # the usual batch: all JPEGs, already in order
        return batch, x_dev
    x = torch.empty((len(rows), *preprocessor.input_shape()), dtype=torch.float32, device=device)
    where = {row: k for k, row in enumerate(rows)}
    if on_device:
        x[[where[i] for i in on_device]] = x_dev
    on_cpu = [i for i in rows if pixels[i] is not None]
    if on_cpu:
        x[[where[i] for i in on_cpu]] = to_model_input(np.stack([pixels[i] for i in on_cpu]), preprocessor, device)
    return batch, x


def _decode_refused(batch: dict, pixels: np.ndarray, refused: dict[int, bytes], preprocessor: Preprocessor) -> dict:
    """PIL for the JPEGs the device decoder refused: their uint8 pixels into ``pixels``, or error rows."""
    batch = {**batch, "decoded": np.array(batch["decoded"], dtype=bool),
             "error_type": np.array(batch["error_type"], dtype=object),
             "error_message": np.array(batch["error_message"], dtype=object)}
    errors: list = [None] * len(batch["uri"])
    # the pixel limit was checked on the headers (device_decodable): no second limit here
    rows, dense = decode_on_cpu(refused.items(), errors, preprocessor, True, sys.maxsize, None)
    for j, i in enumerate(rows):
        pixels[i] = dense[j] if errors[i] is None else None
    for i in refused:
        if errors[i] is not None:
            batch["decoded"][i], (batch["error_type"][i], batch["error_message"][i]) = False, errors[i]
    return batch


