"""The scorer: preprocessed pixels in, top-k labels, scores and embeddings out.

Pixels come from the checkpoint's own preprocessing (:mod:`.preprocess`). The
activation is transformers' pipeline's (:func:`.model.hf_activation`: softmax,
sigmoid for multi-label or one-logit checkpoints, none for regression; timm:
softmax); top-k and activations are computed in fp32 whatever the model's dtype,
and tied scores keep ascending label order, as the pipeline's stable sort does.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from transformers.pipelines import image_classification as hf_ic

from .loading import CheckpointRef, resolve_checkpoint
from .model import LoadedModel, create_model

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPUs that support it and fp32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class ScoreResult:
    """Scores for N images: ids and scores best first, embeddings float32."""

    label_ids: np.ndarray  # (N, k) int32
    scores: np.ndarray  # (N, k) float32
    embedding: np.ndarray  # (N, D) float32
    features: np.ndarray | None = None  # (N, T, D) float32 unpooled tokens, when asked for


class Scorer:
    """Holds one model on one device and scores batches of preprocessed pixels."""

    def __init__(self, ref: CheckpointRef, device: str = "auto", dtype: str = "auto", top_k: int = 5):
        self.ref = ref
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model: LoadedModel = create_model(ref.local_dir, self.device, self.dtype)
        if self.device.type == "cuda":
            # the weights were copied on the default stream; calls run on their own (stream())
            torch.cuda.synchronize(self.device)
        self._streams = threading.local()
        info = self.model.info
        self.top_k = min(top_k, info.num_labels)
        self.embedding_dim = info.embedding_dim
        self.activation = info.activation
        self.id2label = info.labels
        # transformers' pipeline computes its scores in numpy; timm's model cards with torch
        self._pipeline_scores = info.backend == "transformers" and self.activation != "none"

    def stream(self) -> contextlib.AbstractContextManager:
        """A context in which this thread's device work runs on its own CUDA stream (none elsewhere).

        Why: an actor that runs two calls at once on two threads would otherwise
        queue both on the default stream, where one call's upload, decode and
        normalisation wait behind the other's forward pass. Its own stream is also
        idle whenever a call starts (each call ends by copying its results to the
        host), which the device JPEG decoder needs (:mod:`.device_decode`).
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    @torch.inference_mode()
    def score(self, pixel_values: np.ndarray | torch.Tensor, token_features: bool = False) -> ScoreResult:
        """Score a batch of preprocessed pixels (N, 3, H, W); optionally keep unpooled tokens."""
        x = torch.as_tensor(pixel_values).to(self.device, self.dtype, non_blocking=True)
        out = self.model(x)
        if token_features and out.features.dim() != 3:
            raise ValueError(f"token features need a (tokens, width) feature map per image; "
                             f"{self.ref.name} gives {tuple(out.features.shape[1:])} (a CNN's channels x height "
                             "x width): score it without --token-features")
        logits = out.logits.float()  # activations and top-k in fp32 whatever the model dtype
        probs = _ACTIVATIONS[self.activation](logits)
        # not topk: its order among equal scores is arbitrary (and differs by device); saturated
        # sigmoids and bf16 logits tie, and the pipeline's stable sort keeps ascending ids
        scores, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        if self._pipeline_scores:
            exact = _PIPELINE_ACTIVATIONS[self.activation](logits.cpu().numpy())
            ids = ids[:, :self.top_k + _CANDIDATES].cpu().numpy()
            scores, ids = pipeline_top_k(exact, ids, self.top_k)
        else:
            scores = scores[:, :self.top_k].cpu().numpy()
            ids = ids[:, :self.top_k].cpu().numpy()
        return ScoreResult(
            label_ids=ids.astype(np.int32),
            scores=scores,
            embedding=out.embedding.float().cpu().numpy(),
            features=out.features.float().cpu().numpy() if token_features else None,
        )

    def labels(self, label_ids: np.ndarray) -> list[list[str]]:
        """Label names for an (N, k) array of ids."""
        return [[self.id2label[i] for i in row] for row in label_ids.tolist()]


_ACTIVATIONS = {"softmax": lambda x: torch.softmax(x, dim=-1), "sigmoid": torch.sigmoid, "none": lambda x: x}
# the pipeline's own functions (numpy, float32): torch's kernels round about half of the
# softmax's values and a sixth of the sigmoid's differently in the last bit
_PIPELINE_ACTIVATIONS = {"softmax": hf_ic.softmax, "sigmoid": hf_ic.sigmoid}
_CANDIDATES = 8  # ids past top_k that the device's sort hands to pipeline_top_k


def pipeline_top_k(exact: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of each row's ``k`` best ``exact`` scores, ties in ascending id order.

    The order is the pipeline's (a stable sort, descending). ``candidates`` are each row's
    first ids by the device's sort of scores within a bit of ``exact``, so the k best are
    among them; a row where an id outside them reaches the k-th score (more near-ties than
    the candidates hold) is sorted whole instead.
    """
    picked = np.take_along_axis(exact, candidates, axis=1)
    order = np.lexsort((candidates, -picked), axis=1)  # by score descending, then by id
    ids = np.take_along_axis(candidates, order, axis=1)[:, :k]
    scores = np.take_along_axis(picked, order, axis=1)[:, :k]
    rest = exact.copy()
    np.put_along_axis(rest, candidates, -np.inf, axis=1)
    for row in np.flatnonzero(rest.max(axis=1, initial=-np.inf) >= scores[:, -1]):
        whole = np.lexsort((np.arange(exact.shape[1]), -exact[row]))[:k]
        ids[row], scores[row] = whole, exact[row, whole]
    return scores, ids


def create_scorer(
    model: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    top_k: int = 5,
    storage_options: dict | None = None,
) -> Scorer:
    """Resolve ``model`` (hub id, directory or fsspec URI) and build a :class:`Scorer`."""
    ref = resolve_checkpoint(model, revision=revision, storage_options=storage_options)
    return Scorer(ref, device=device, dtype=dtype, top_k=top_k)
