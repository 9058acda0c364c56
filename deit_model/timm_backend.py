"""The optional timm backend: timm checkpoints scored exactly as timm scores them.

A timm checkpoint directory is what ``timm.models.save_for_hf`` writes and the
hub's ``timm/<name>`` repositories hold: ``config.json`` with ``architecture``,
``model_args`` and ``pretrained_cfg``, and ``model.safetensors``. The model is
built with ``timm.create_model("local-dir:<dir>", pretrained=True)``, the
preprocessing with ``create_transform(**resolve_data_config(model=...))`` and
the labels from timm's own ImageNet class names (no download).
"""
from __future__ import annotations

import logging

from .loading import ModelLoadError

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
    names = cfg.get("label_descriptions") or cfg.get("label_names")
    if isinstance(names, dict):
        return [str(names.get(str(i), names.get(i, f"class_{i}"))) for i in range(num_classes)]
    if isinstance(names, list) and len(names) == num_classes:
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
