"""The scoring actor: a thin Ray Data callable class over ``deit_model.Scorer``."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from deit_model import create_scorer

from .schema import ERROR_COLUMNS, scored_schema

logger = logging.getLogger(__name__)


class ScoringActor:
    """Loads the model once per actor; each call scores one batch of decoded rows."""

    def __init__(self, *, model: str, revision: str | None, device: str, dtype: str, top_k: int,
                 storage_options: dict, run_id: str, model_name: str):
        self.scorer = create_scorer(model, revision=revision, device=device, dtype=dtype,
                                    top_k=top_k, storage_options=storage_options)
        self.run_id = run_id
        self.model_name = model_name
        self.schema = scored_schema(self.scorer.embedding_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        ok = np.array([e is None for e in batch["error_type"]], dtype=bool)
        result = self.scorer.score(batch["pixel_values"][ok]) if ok.any() else None
        cols = {name: [None] * n for name in ("label_ids", "labels", "scores", "embedding", "activation")}
        if result is not None:
            rows = np.flatnonzero(ok)
            labels = self.scorer.labels(result.label_ids)
            for j, i in enumerate(rows):
                cols["label_ids"][i] = result.label_ids[j]
                cols["labels"][i] = labels[j]
                cols["scores"][i] = result.scores[j]
                cols["embedding"][i] = result.embedding[j]
                cols["activation"][i] = self.scorer.activation
        now = datetime.now(timezone.utc)
        data = {
            "uri": batch["uri"], **cols,
            "model": [self.model_name] * n, "model_revision": [self.scorer.ref.revision] * n,
            "run_id": [self.run_id] * n, "scored_at": [now] * n,
            "source_size": batch["source_size"], "source_etag": batch["source_etag"],
            "source_mtime": batch["source_mtime"],
            **{c: batch[c] for c in ERROR_COLUMNS},
        }
        return pa.Table.from_pydict({k: _arrow(v, self.schema.field(k).type) for k, v in data.items()},
                                    schema=self.schema)


def _arrow(values, typ: pa.DataType) -> pa.Array:
    if isinstance(values, np.ndarray) and values.dtype != object:
        # Passthrough columns came through numpy: nulls are NaN/NaT there and
        # timestamps lost their time zone, so convert pandas-style, then cast.
        return pa.array(values, from_pandas=True).cast(typ)
    return pa.array(list(values), type=typ, from_pandas=True)
