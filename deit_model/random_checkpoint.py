"""Randomly initialised checkpoints with the published configurations.

No model hub is reachable on the machines this project is built and tested on,
so tests, benchmarks and the offline demo build checkpoints themselves: the real
architecture with the real ``config.json`` and ``preprocessor_config.json`` of
the named hub checkpoint (kept in ``configs/hub-configs.json``), random weights,
saved with ``save_pretrained`` (safetensors) and loaded back through the same
code path as any user's checkpoint. Their labels are real names but the
predictions mean nothing.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "configs"


@lru_cache(maxsize=1)
def _hub_configs() -> dict:
    return json.loads((_CONFIG_DIR / "hub-configs.json").read_text())


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, as the hub configs' ``id2label`` spell them."""
    return json.loads((_CONFIG_DIR / "imagenet-1k-labels.json").read_text())


def known_checkpoints() -> list[str]:
    """Hub ids whose published configuration is kept here."""
    return sorted(_hub_configs())


def create_random_checkpoint(name: str, out_dir: str | Path, *, seed: int = 0, labels: list[str] | None = None,
                             **overrides) -> Path:
    """Write a random-weight checkpoint of hub model ``name`` to ``out_dir``.

    ``overrides`` change config fields (for example ``hidden_size=64,
    num_hidden_layers=2`` for a fast test model, or ``problem_type``) while
    keeping the architecture and preprocessing; ``labels`` gives a fine-tune
    its own label set (the head gets one output per label).
    """
    import transformers

    if name not in _hub_configs():
        raise KeyError(f"no published configuration for {name!r}; known: {known_checkpoints()}")
    entry = _hub_configs()[name]
    cfg = dict(entry["config"], **overrides)
    num_labels = len(labels) if labels else int(cfg.pop("num_labels", 1000))
    cfg.pop("num_labels", None)
    names = labels or (imagenet_labels() if num_labels == 1000 else [f"class_{i}" for i in range(num_labels)])
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
    config = transformers.AutoConfig.for_model(**cfg)
    cls = getattr(transformers, cfg["architectures"][0])
    torch.manual_seed(seed)
    model = cls(config).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(entry["preprocessor_config"], indent=2))
    logger.info("wrote random-weight %s checkpoint to %s", name, out)
    return out


def create_random_timm_checkpoint(name: str, out_dir: str | Path, *, seed: int = 0, **model_args) -> Path:
    """Write a random-weight timm checkpoint of ``name`` (with its pretrained tag's config).

    ``model_args`` (for example ``depth=2, embed_dim=64, num_heads=2``) shrink the
    model for logic tests; they are recorded so the checkpoint loads back as saved.
    """
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **model_args).eval()
    out = Path(out_dir)
    save_for_hf(model, out, safe_serialization=True, model_args=model_args or None)
    logger.info("wrote random-weight timm %s checkpoint to %s", name, out)
    return out
