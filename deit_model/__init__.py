"""DeiT scoring: checkpoint loading, decoding, preprocessing and scoring.

Imports torch and the model libraries only; no orchestration code lives here.
"""
from .decode import DecodeError, decode_image
from .loading import CheckpointRef, ModelLoadError, resolve_checkpoint
from .model import embedding_dim, read_config
from .random_checkpoint import create_random_checkpoint, known_checkpoints
from .scorer import ScoreResult, Scorer, create_scorer, input_shape, load_image_processor, preprocess

__all__ = [
    "CheckpointRef", "DecodeError", "ModelLoadError", "ScoreResult", "Scorer",
    "create_random_checkpoint", "create_scorer", "decode_image", "embedding_dim", "read_config", "input_shape", "known_checkpoints",
    "load_image_processor", "preprocess", "resolve_checkpoint",
]
