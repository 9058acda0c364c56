"""DeiT scoring: checkpoint loading, decoding, preprocessing and scoring.

Imports torch and the model libraries only; no orchestration code lives here.
"""
from .decode import DecodeError, decode_image
from .loading import CheckpointRef, ModelLoadError, resolve_checkpoint
from .model import CheckpointInfo, embedding_dim, inspect_checkpoint
from .preprocess import Preprocessor, load_preprocessor
from .random_checkpoint import create_random_checkpoint, create_random_timm_checkpoint, known_checkpoints
from .scorer import ScoreResult, Scorer, create_scorer

__all__ = [
    "CheckpointInfo", "CheckpointRef", "DecodeError", "ModelLoadError", "Preprocessor", "ScoreResult",
    "Scorer", "create_random_checkpoint", "create_random_timm_checkpoint", "create_scorer", "decode_image",
    "embedding_dim", "inspect_checkpoint", "known_checkpoints", "load_preprocessor", "resolve_checkpoint",
]
