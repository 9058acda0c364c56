"""Build a classification model from a checkpoint and define its outputs.

The architecture is chosen from the checkpoint's ``config.json`` (its
``architectures`` entry), never from its name. Each architecture defines two
things, as the reference library does:

* logits: distilled DeiT averages its class-token and distillation-token heads;
  ViT-class checkpoints (the non-distilled DeiTs) use the class-token head;
* the pooled embedding: the mean of the final-norm class and distillation tokens
  for distilled DeiT (timm's ``forward_head(pre_logits=True)``), the final-norm
  class token otherwise. ``pooler_output`` is never used: classification
  checkpoints carry no pooler weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .loading import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass
class ModelOutputs:
    """Raw outputs of one forward pass."""

    logits: torch.Tensor
    embedding: torch.Tensor
    features: torch.Tensor  # final-norm token sequence (unpooled)


def _distilled_forward(model, pixel_values: torch.Tensor) -> ModelOutputs:
    hidden = model.deit(pixel_values).last_hidden_state  # already final-LayerNorm
    cls_tok, dist_tok = hidden[:, 0], hidden[:, 1]
    logits = (model.cls_classifier(cls_tok) + model.distillation_classifier(dist_tok)) / 2
    return ModelOutputs(logits, (cls_tok + dist_tok) / 2, hidden)


def _cls_token_forward(backbone_attr: str):
    def forward(model, pixel_values: torch.Tensor) -> ModelOutputs:
        hidden = getattr(model, backbone_attr)(pixel_values).last_hidden_state
        return ModelOutputs(model.classifier(hidden[:, 0]), hidden[:, 0], hidden)

    return forward


# architecture name in config.json -> (transformers class name, forward)
_ARCHITECTURES: dict[str, tuple[str, Callable]] = {
    "DeiTForImageClassificationWithTeacher": (
        "DeiTForImageClassificationWithTeacher", _distilled_forward),
    "DeiTForImageClassification": ("DeiTForImageClassification", _cls_token_forward("deit")),
    "ViTForImageClassification": ("ViTForImageClassification", _cls_token_forward("vit")),
}


def supported_architectures() -> list[str]:
    """Architecture names (``config.architectures[0]``) this package can score."""
    return sorted(_ARCHITECTURES)


@dataclass
class LoadedModel:
    """A model in eval mode with the forward that defines its outputs."""

    module: torch.nn.Module
    forward: Callable[[torch.nn.Module, torch.Tensor], ModelOutputs]
    config: object

    def __call__(self, pixel_values: torch.Tensor) -> ModelOutputs:
        return self.forward(self.module, pixel_values)


def read_config(local_dir: str):
    """The checkpoint's config, checked to be an architecture we can score."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(local_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read config.json in {local_dir!r}: {exc}") from exc
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"checkpoint architecture {arch!r} is not supported; supported: "
            + ", ".join(supported_architectures())
        )
    return config


def embedding_dim(config) -> int:
    """Width of the pooled embedding: the transformer's hidden size for every family here."""
    return int(config.hidden_size)


def create_model(local_dir: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load the checkpoint in ``local_dir`` onto ``device`` in ``dtype``."""
    import transformers

    config = read_config(local_dir)
    cls_name, forward = _ARCHITECTURES[config.architectures[0]]
    cls = getattr(transformers, cls_name)
    try:
        # safetensors when present; a .bin only through torch.load(weights_only=True),
        # which refuses any pickle that would run code. Never trust_remote_code.
        module = cls.from_pretrained(
            local_dir, dtype=dtype, attn_implementation="sdpa", weights_only=True, trust_remote_code=False
        )
    except Exception as exc:  # UnpicklingError, OSError, ValueError, size mismatches
        if "Weights only load failed" in str(exc):
            # torch's own text suggests weights_only=False: exactly what must not happen
            raise ModelLoadError(
                f"refused to load {local_dir!r}: its pickled weights hold objects other than "
                "tensors (possibly code); convert the checkpoint to safetensors") from None
        raise ModelLoadError(f"cannot load weights from {local_dir!r}: {exc}") from exc
    module.to(device).eval()
    logger.info("loaded %s (%s) on %s as %s", local_dir, config.architectures[0], device, dtype)
    return LoadedModel(module, forward, config)
