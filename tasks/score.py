"""The scoring actor: a thin Ray actor class over ``deit_model.Scorer``."""
from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from .batch_reads import read_batch
from .decode import decode_batch
from .device_jpeg import device_model_input
from .plan import CheckpointChanged
from .schema import ERROR_COLUMNS, OutputSpec, scored_schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchContext:
    """What a batch's rows need besides the model: the run's lineage and output, and the decoding.

    With ``decode`` (:func:`decode_batch`'s options other than the
    preprocessor, which the actor reads from its checkpoint) the actor decodes
    its plan rows itself: on CPU-only machines decode and model share the same
    cores anyway, and one process fewer starts and no pixels cross the object
    store.
    """

    run_id: str
    model_name: str
    spec: OutputSpec
    decode: dict | None = None
    model_revision: str | None = None  # for rows the driver writes itself (process_error_rows)


class ScoringActor:
    """Loads the model once per actor; each call scores one batch of plan or decoded rows.

    The constructor takes only the model, so actors can start before the run
    they will serve is known; the run comes with every call (a restarted
    actor then needs nothing re-sent). Calls may run on two threads: on a GPU
    actor the model runs one batch at a time, and a batch's transfer and Arrow
    rows overlap another's forward pass; on a CPU actor that reads its own
    images one call decodes and scores at a time, and the other reads its
    batch meanwhile (actor_pool.READ_AHEAD_CONCURRENCY).
    """

    _profiler = None  # a few seconds of the device's timeline, a diagnostic: see _attach

    def __init__(self, *, model: str, revision: str | None, device: str, dtype: str, top_k: int,
                 storage_options: dict):
        # imported here: the driver names this class without loading torch
        from deit_model import create_scorer, keep_freed_memory, load_preprocessor

        scorer = create_scorer(model, revision=revision, device=device, dtype=dtype,
                               top_k=top_k, storage_options=storage_options)
        # after loading, whose temporary copies of the weights are best handed back: from
        # here on, each batch reuses the last one's freed buffers (deit_model.host_memory)
        keep_freed_memory()
        # the checkpoint's own preprocessing: applied here when the actor decodes,
        # and reported for the output's lineage either way
        self._attach(scorer, load_preprocessor(scorer.ref.local_dir))

    def _attach(self, scorer, preprocessor) -> None:
        """Hold ``scorer`` and ``preprocessor``, with the per-actor state the calls share."""
        self.scorer, self.preprocessor = scorer, preprocessor
        self._schemas: dict[OutputSpec, pa.Schema] = {}
        # one forward pass at a time. Device memory is not halved by it: the caching allocator
        # keeps each call thread's stream's blocks apart, about two forward passes' worth
        self._model_lock = threading.Lock()
        # a CPU actor's one core decodes and scores one batch at a time, always on this one thread;
        # a second call only reads its images meanwhile (actor_pool.READ_AHEAD_CONCURRENCY). On the
        # two call threads in turn, glibc kept a forward pass's buffers in each thread's arena:
        # about 150 MiB more per actor (docs/architecture.md). A GPU actor's calls overlap.
        self._cpu_worker = ThreadPoolExecutor(1, thread_name_prefix="cpu-work") if scorer.device.type == "cpu" else None
        if scorer.device.type == "cuda" and preprocessor.splits_exactly():  # else normalize() is never used
            _warm_normalize(preprocessor, scorer.device)
        from deit_model.profiling import profiler_from_env

        self._profiler = profiler_from_env()  # set only where DEIT_PROFILE_DIR is (docs/benchmarks.md)

    def preprocessing(self) -> dict:
        """The preprocessing configuration, for the output's lineage."""
        return self.preprocessor.to_dict()

    def score_batch(self, batch: dict[str, np.ndarray], context: BatchContext) -> pa.Table:
        """Score one batch into a table of :func:`~tasks.schema.scored_schema` rows."""
        if context.model_revision is not None and self.scorer.ref.revision != context.model_revision:
            # an actor (re)started mid-run loaded its checkpoint again: it must be the run's
            raise CheckpointChanged(f"this actor loaded {self.scorer.ref.name} at revision "
                                    f"{self.scorer.ref.revision}, but the run scores with {context.model_revision}")
        spec = context.spec
        schema = self._schemas.get(spec)
        if schema is None:  # one per run's output spec, built once
            schema = self._schemas[spec] = scored_schema(spec)
        # read on the call's own thread: this call waits for storage while another one works
        decode = context.decode
        datas = read_batch(batch, decode["storage_options"], decode.get("max_bytes")) if decode is not None else None
        work = functools.partial(self._decode_and_score, batch, context, datas)
        batch, cols = work() if self._cpu_worker is None else self._cpu_worker.submit(work).result()
        if self._profiler is not None:
            self._profiler.on_call(len(batch["decoded"]))
        return _table({**_passthrough(batch, context, self.scorer.ref.revision), **cols}, schema)

    def _decode_and_score(self, batch: dict[str, np.ndarray], context: BatchContext, datas) -> tuple[dict, dict]:
        """(the batch's rows, their prediction columns): decoded from ``datas`` first where the actor decodes."""
        with self.scorer.stream():  # device work on this call thread's own CUDA stream
            if context.decode is not None:
                batch = decode_batch(batch, preprocessor=self.preprocessor, datas=datas, **context.decode)
            batch, x = self._model_input(batch)
            return batch, self._prediction_columns(x, np.asarray(batch["decoded"], dtype=bool), context.spec)

    def _model_input(self, batch: dict[str, np.ndarray]):
        """(batch, the decoded rows' float32 pixels on the model's device, or None if there are none)."""
        device = self.scorer.device
        if "jpeg_data" in batch:  # decode_batch(device_jpeg=True): JPEGs decoded here, on the device
            return device_model_input(batch, self.preprocessor, device)
        ok = np.asarray(batch["decoded"], dtype=bool)
        if not ok.any():
            return batch, None
        from deit_model import to_model_input  # here: the driver imports this module without torch

        return batch, to_model_input(batch["pixel_values"][ok], self.preprocessor, device)

    def _prediction_columns(self, x, ok: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
        """Score the decodable rows (model input ``x``); error rows get nulls in every prediction column."""
        n, k, dim = len(ok), self.scorer.top_k, spec.embedding_dim
        ids, scores = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
        emb, feats = np.zeros((n, dim), np.float32), None
        labels: list = [None] * n
        if x is not None:
            rows = np.flatnonzero(ok)
            with self._model_lock:
                result = self.scorer.score(x, token_features=spec.token_features)
            ids[rows], scores[rows], emb[rows] = result.label_ids, result.scores, result.embedding
            for row, names in zip(rows, self.scorer.labels(result.label_ids)):
                labels[row] = names
            if result.features is not None:
                feats = np.zeros((n, *result.features.shape[1:]), np.float32)
                feats[rows] = result.features
        null = pa.array(~ok)
        value_np = np.float16 if spec.float16 else np.float32
        cols = {
            "label_ids": _lists(ids, null), "labels": pa.array(labels, pa.list_(pa.string())),
            "scores": _lists(scores, null),
            "activation": pa.array([self.scorer.activation if o else None for o in ok], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(value_np).ravel()), dim, mask=null),
        }
        if spec.token_features:
            cols["token_features"] = _token_lists(feats, n, dim, value_np, null)
        return cols


PROCESS_DIED = "process_died"  # error_type of an image whose scoring process died each time


def _warm_normalize(preprocessor, device) -> None:
    """Build the normalisation's lookup table on the device once, before two call threads share it.

    The table is copied to the device on the stream of the first call
    (:meth:`deit_model.Preprocessor.normalize`): another thread's stream could
    otherwise read it before that copy ran.
    """
    import torch

    preprocessor.normalize(torch.zeros((1, 3, 8, 8), dtype=torch.uint8, device=device))
    torch.cuda.synchronize(device)


def process_error_rows(batch: dict[str, np.ndarray], context: BatchContext, message: str) -> pa.Table:
    """Error rows (``process_died``) for plan rows that no process could score, built in the driver."""
    schema = scored_schema(context.spec)
    n = len(batch["uri"])
    errors = {"error_type": np.array([PROCESS_DIED] * n, object), "error_message": np.array([message] * n, object)}
    data = _passthrough({**batch, **errors}, context, context.model_revision)
    # every prediction column null: the same shape as a decode failure's row
    return _table({**data, **{f.name: pa.nulls(n, f.type) for f in schema if f.name not in data}}, schema)


def _passthrough(batch: dict, context: BatchContext, revision: str | None) -> dict:
    """Every output column but the predictions: the plan's, the lineage and the error columns."""
    n = len(batch["uri"])
    return {
        "uri": batch["uri"], "model": [context.model_name] * n, "model_revision": [revision] * n,
        "run_id": [context.run_id] * n, "scored_at": [datetime.now(timezone.utc)] * n,
        "source_size": batch["source_size"], "source_etag": batch["source_etag"],
        "source_mtime": batch["source_mtime"],
        **{c: batch[c] for c in ERROR_COLUMNS},
    }


def _table(data: dict, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: _arrow(data[f.name], f.type) for f in schema}, schema=schema)


def _lists(values: np.ndarray, null: pa.Array) -> pa.Array:
    """(N, k) array -> list<...> array of N rows, null where ``null``."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel()), mask=null)


def _token_lists(feats: np.ndarray | None, n: int, dim: int, value_np, null: pa.Array) -> pa.Array:
    """(N, T, D) tokens -> list<fixed_size_list<D>> of N rows; None means every row failed."""
    if feats is None:
        feats = np.zeros((n, 0, dim), np.float32)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(feats.astype(value_np).ravel()), dim)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * feats.shape[1])
    return pa.ListArray.from_arrays(offsets, flat, mask=null)


def _arrow(values, typ: pa.DataType) -> pa.Array:
    if isinstance(values, pa.Array):
        return values if values.type == typ else values.cast(typ)
    if isinstance(values, np.ndarray) and values.dtype != object:
        # Passthrough columns came through numpy: nulls are NaN/NaT there and
        # timestamps lost their time zone, so convert pandas-style, then cast.
        return pa.array(values, from_pandas=True).cast(typ)
    return pa.array(list(values), type=typ, from_pandas=True)
