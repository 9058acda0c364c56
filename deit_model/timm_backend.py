"""The optional timm backend: timm checkpoints scored exactly as timm scores them.

A timm checkpoint directory is what ``timm.models.save_for_hf`` writes and the
hub's ``timm/<name>`` repositories hold: ``config.json`` with ``architecture``,
``model_args`` and ``pretrained_cfg``, and ``model.safetensors``. The model is
built with ``timm.create_model("local-dir:<dir>", pretrained=True)``, the
preprocessing with ``create_transform(**resolve_data_config(model=...))`` and
the labels from timm's own ImageNet class names (no download).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Sequence

import numpy as np

from .loading import ModelLoadError
from .preprocess import Preprocessor

logger = logging.getLogger(__name__)


def _timm():
    try:
        import timm
    except ImportError as exc:  # optional dependency
        raise ModelLoadError(
            "this is a timm checkpoint but timm is not installed; pip install 'deit-batch-scoring[timm]'"
        ) from exc
    return timm


def timm_info(cfg: dict):
    """CheckpointInfo from a timm ``config.json``."""
    from .model import CheckpointInfo

    num_classes = int(cfg.get("num_classes", 0))
    return CheckpointInfo("timm", cfg["architecture"], int(cfg["num_features"]),
                          _labels(cfg, num_classes), extra={"pretrained_cfg": cfg.get("pretrained_cfg", {})})


def _labels(cfg: dict, num_classes: int) -> list[str]:
    """Each class's label as timm's ``CustomDatasetInfo.index_to_description`` gives it.

    ``label_names`` lists (or maps by index) each class's name, a synset say;
    ``label_descriptions`` maps a *name* to its description. Read by index, it once gave
    every class ``class_<i>`` for a checkpoint saved with both.
    """
    names, descriptions = cfg.get("label_names"), cfg.get("label_descriptions")
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i)) for i in range(num_classes)]
    if isinstance(names, list) and len(names) == num_classes and None not in names:
        if isinstance(descriptions, dict):
            return [str(descriptions.get(n, n)) for n in names]
        return [str(n) for n in names]
    data = _timm().data
    subset = data.infer_imagenet_subset(cfg)
    if subset:  # timm ships the ImageNet class names
        info = data.ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def create_timm_model(local_dir: str):
    """The timm model in ``local_dir`` with its weights, on CPU, in eval mode."""
    timm = _timm()
    try:
        return timm.create_model("local-dir:" + local_dir, pretrained=True).eval()
    except Exception as exc:  # noqa: BLE001 - translated at this boundary
        from .model import weights_error

        raise weights_error(local_dir, exc) from exc


def data_config(local_dir: str) -> dict:
    """timm's resolved data config (input size, interpolation, crop_pct, mean/std)."""
    timm = _timm()
    # timm's own parser of config.json (it applies model_args such as img_size to
    # the pretrained_cfg); private, but parsing it ourselves would drift from timm
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, _, _ = load_model_config_from_path(local_dir)
    return dict(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()
                                              if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg))


def create_transform(config: dict):
    """timm's eval transform for ``config`` (PIL image -> normalised tensor)."""
    return _timm().data.create_transform(**config, is_training=False)


class TimmPreprocessor(Preprocessor):
    """timm's eval transform for a checkpoint's data config."""

    def __init__(self, config: dict):
        self.config = config
        self.transform = create_transform(config)

    def __call__(self, images: Sequence) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, *self.config["input_size"]), dtype=np.float32)
        return torch.stack([self.transform(img) for img in images]).numpy().astype(np.float32, copy=False)

    def to_uint8(self, images: Sequence) -> np.ndarray:
        head, _ = self._halves
        return np.stack([np.asarray(head(img)).transpose(2, 0, 1) for img in images])

    def geometry(self, images: Sequence):
        import torch

        head, _ = self._halves  # Resize and CenterCrop take tensors too (antialiased, not PIL's code)
        return torch.stack([head(t) for t in images])

    def _value_steps(self, x):
        import torch

        _, tail = self._halves
        # what ToTensor does to 8-bit pixels, then the steps after it (Normalize)
        return tail(x.to(torch.float32).div(255))

    @functools.cached_property
    def _halves(self):
        """The transform's steps before and after its ToTensor (built once, used every batch)."""
        from torchvision import transforms

        steps = list(self.transform.transforms)
        cut = next(i for i, t in enumerate(steps) if isinstance(t, transforms.ToTensor))
        return transforms.Compose(steps[:cut]), transforms.Compose(steps[cut + 1:])

    def to_dict(self) -> dict:
        return {"library": "timm", **{k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}}

    def _resize(self) -> tuple[str | None, Any]:
        # the eval transform's crop_mode "center" (the default) resizes the shortest edge;
        # "squash" and "border" fit the image into a square of that side
        side = self.min_decode_side()
        return ("shortest_edge", side) if self.config.get("crop_mode", "center") == "center" else ("fixed", (side, side))

    def min_decode_side(self) -> int:
        # timm resizes the shortest edge to input_size / crop_pct before cropping
        return int(math.floor(max(self.config["input_size"][1:]) / self.config.get("crop_pct", 1.0)))
