"""Models and what their outputs mean, for every backend.

A checkpoint directory names its backend through its ``config.json``: a
transformers config has ``model_type``, a timm config has ``architecture``.
The architecture is chosen from that file, never from the checkpoint's name,
and each architecture defines, as its reference library does:

* logits: distilled DeiT averages its class-token and distillation-token heads;
  ViT-class checkpoints (the non-distilled DeiTs) use the class-token head;
  timm models use ``forward_head``;
* the pooled embedding: the mean of the final-norm class and distillation tokens
  for distilled DeiT (timm's ``forward_head(pre_logits=True)``), the final-norm
  class token for ViT-class models, the class token after the class-attention
  blocks for CaiT. ``pooler_output`` is never used: classification
  checkpoints carry no pooler weights.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .loading import ModelLoadError

if TYPE_CHECKING:  # torch is imported where a model is built, not to read a config
    import torch

logger = logging.getLogger(__name__)


@dataclass
class ModelOutputs:
    """Raw outputs of one forward pass."""

    logits: torch.Tensor
    embedding: torch.Tensor
    features: torch.Tensor  # final-norm token sequence (unpooled)


@dataclass
class CheckpointInfo:
    """What a checkpoint is, read from its config alone (no weights loaded)."""

    backend: str  # "transformers" or "timm"
    architecture: str
    embedding_dim: int
    labels: list[str]
    activation: str = "softmax"  # "softmax", "sigmoid" or "none", as transformers' pipeline chooses
    extra: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass
class LoadedModel:
    """A model in eval mode with the forward that defines its outputs."""

    module: torch.nn.Module
    forward: Callable[[torch.nn.Module, torch.Tensor], ModelOutputs]
    info: CheckpointInfo

    def __call__(self, pixel_values: torch.Tensor) -> ModelOutputs:
        return self.forward(self.module, pixel_values)


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


# transformers architecture in config.json -> forward defining logits and embedding
_HF_ARCHITECTURES: dict[str, Callable] = {
    "DeiTForImageClassificationWithTeacher": _distilled_forward,
    "DeiTForImageClassification": _cls_token_forward("deit"),
    "ViTForImageClassification": _cls_token_forward("vit"),
}


def supported_architectures() -> list[str]:
    """transformers architecture names (``config.architectures[0]``) this package scores."""
    return sorted(_HF_ARCHITECTURES)


def read_config(local_dir: str) -> dict:
    """The checkpoint's ``config.json`` as a dict."""
    try:
        with open(os.path.join(local_dir, "config.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read config.json in {local_dir!r}: {exc}") from exc


def inspect_checkpoint(local_dir: str) -> CheckpointInfo:
    """Backend, architecture, embedding width and labels of a checkpoint directory."""
    cfg = read_config(local_dir)
    if "architecture" in cfg and "model_type" not in cfg:
        from .timm_backend import timm_info

        return timm_info(cfg)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in _HF_ARCHITECTURES:
        raise ModelLoadError(
            f"checkpoint architecture {arch!r} is not supported; supported: "
            + ", ".join(supported_architectures()) + ", or a timm model (save_for_hf)")
    id2label = cfg.get("id2label") or {}
    num_labels = len(id2label) or int(cfg.get("num_labels", 2))
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(num_labels)]
    return CheckpointInfo("transformers", arch, int(cfg["hidden_size"]), labels,
                          activation=hf_activation(cfg.get("problem_type"), num_labels))


def hf_activation(problem_type: str | None, num_labels: int) -> str:
    """The activation transformers' image-classification pipeline applies by default.

    Its rule, in its order: none for regression; sigmoid for multi-label or a single
    logit (a one-label "is it X" fine-tune, whose softmax would always be 1.0); else softmax.
    """
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def embedding_dim(local_dir: str) -> int:
    """Width of the pooled embedding of the checkpoint in ``local_dir``."""
    return inspect_checkpoint(local_dir).embedding_dim


def create_model(local_dir: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load the checkpoint in ``local_dir`` onto ``device`` in ``dtype``."""
    info = inspect_checkpoint(local_dir)
    if info.backend == "timm":
        from .timm_backend import create_timm_model

        module, forward = create_timm_model(local_dir), _timm_forward
        _check_timm_width(module, info)
    else:
        module, forward = _create_hf_model(local_dir, info, dtype), _HF_ARCHITECTURES[info.architecture]
    module.to(device=device, dtype=dtype).eval()
    logger.info("loaded %s (%s %s) on %s as %s", local_dir, info.backend, info.architecture, device, dtype)
    return LoadedModel(module, forward, info)


def _check_timm_width(module: torch.nn.Module, info: CheckpointInfo) -> None:
    """Refuse a timm model whose pooled embedding is not config.json's ``num_features`` wide.

    The output's embedding column is sized from config.json before any model
    is built (the driver never imports torch); models with a hidden layer in
    their head (MobileNetV3, say: ``head_hidden_size``) pool to another width.
    """
    width = getattr(module, "head_hidden_size", None) or module.num_features
    if width != info.embedding_dim:
        raise ModelLoadError(
            f"timm {info.architecture}: its pooled embedding is {width} wide, not config.json's num_features "
            f"({info.embedding_dim}); timm models with a hidden layer in the head are not supported")


def _timm_forward(model, pixel_values: torch.Tensor) -> ModelOutputs:
    features = model.forward_features(pixel_values)
    return ModelOutputs(model.forward_head(features), model.forward_head(features, pre_logits=True), features)


def _create_hf_model(local_dir: str, info: CheckpointInfo, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, info.architecture)
    try:
        # safetensors when present; a .bin only through torch.load(weights_only=True),
        # which refuses any pickle that would run code. Never trust_remote_code.
        return cls.from_pretrained(
            local_dir, dtype=dtype, attn_implementation="sdpa", weights_only=True, trust_remote_code=False)
    except Exception as exc:  # UnpicklingError, OSError, ValueError, size mismatches
        raise weights_error(local_dir, exc) from exc


def weights_error(local_dir: str, exc: BaseException) -> ModelLoadError:
    """A ModelLoadError for weights that failed to load, naming refused pickles as such."""
    chain, cause = [], exc
    while cause is not None and len(chain) < 8:  # timm and transformers wrap torch's error
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    if any("Weights only load failed" in text for text in chain):
        # torch's own text suggests weights_only=False: exactly what must not happen
        return ModelLoadError(
            f"refused to load {local_dir!r}: its pickled weights hold objects other than "
            "tensors (possibly code); convert the checkpoint to safetensors")
    return ModelLoadError(f"cannot load weights from {local_dir!r}: {exc}")
