"""DeiT scoring: checkpoint loading, decoding, preprocessing and scoring.

Imports torch and the model libraries only; no orchestration code lives here.
Names are imported on first use (PEP 562), so a caller that only resolves or
inspects a checkpoint does not pay seconds of torch and transformers imports.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DecodeError": "decode", "decode_image": "decode", "device_decodable": "decode",
    "decode_jpegs": "device_decode", "jpegs_to_model_input": "device_decode",
    "keep_freed_memory": "host_memory",
    "CheckpointRef": "loading", "ModelLoadError": "loading", "resolve_checkpoint": "loading",
    "CheckpointInfo": "model", "embedding_dim": "model", "inspect_checkpoint": "model",
    "Preprocessor": "preprocess", "load_preprocessor": "preprocess", "check_preprocessing": "preprocess",
    "create_preprocessor": "preprocess", "to_model_input": "preprocess",
    "create_random_checkpoint": "random_checkpoint", "create_random_timm_checkpoint": "random_checkpoint",
    "known_checkpoints": "random_checkpoint",
    "ScoreResult": "scorer", "Scorer": "scorer", "create_scorer": "scorer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
