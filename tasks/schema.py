"""The output's Parquet schema and layout, defined once.

Layout under the output root::

    predictions/model_slug=<slug>/run_date=<YYYY-MM-DD>/part-<run_id>-<attempt>-<NNNNN>.parquet
    errors/model_slug=<slug>/run_date=<YYYY-MM-DD>/part-<run_id>-<attempt>-<NNNNN>.parquet
    _runs/<run_id>/plan.parquet, _runs/<run_id>/manifest.json
    _staging/<run_id>/...   (a run's files until it commits; see tasks/commit.py)

The partition keys are named ``model_slug`` and ``run_date`` and are not
columns inside the files: a key that is also a file column makes
``pyarrow.parquet.read_table(dir)`` fail to merge types. The file columns
``model`` and ``scored_at`` carry the same facts at full precision.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = "1"
TS = pa.timestamp("us", tz="UTC")

PLAN_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source_size", pa.int64()),
        pa.field("source_etag", pa.string()),
        pa.field("source_mtime", TS),
    ]
)

_RUN_FIELDS = [
    pa.field("model", pa.string(), nullable=False),
    pa.field("model_revision", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
]


@dataclass(frozen=True)
class OutputSpec:
    """What a run's predictions hold: embedding width and type, token features or not."""

    embedding_dim: int
    float16: bool = False  # embeddings (and token features) as float16 to halve their size
    token_features: bool = False  # keep the unpooled final-norm tokens (large: T x D per image)

    @property
    def value_type(self) -> pa.DataType:
        return pa.float16() if self.float16 else pa.float32()


def predictions_schema(spec: OutputSpec) -> pa.Schema:
    """Schema of the predictions table."""
    fields = [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label_ids", pa.list_(pa.int32())),  # best first
        pa.field("labels", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float32())),  # sorted descending
        pa.field("activation", pa.string()),  # softmax, sigmoid or none (models.md)
        pa.field("embedding", pa.list_(spec.value_type, spec.embedding_dim)),
        *_RUN_FIELDS,
        pa.field("scored_at", TS, nullable=False),
        *list(PLAN_SCHEMA)[1:],
    ]
    if spec.token_features:
        fields.append(pa.field("token_features", pa.list_(pa.list_(spec.value_type, spec.embedding_dim))))
    return pa.schema(fields, metadata={b"deit_scoring.schema_version": SCHEMA_VERSION.encode()})


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        *_RUN_FIELDS,
        pa.field("failed_at", TS, nullable=False),
        *list(PLAN_SCHEMA)[1:],
    ],
    metadata={b"deit_scoring.schema_version": SCHEMA_VERSION.encode()},
)

# What a scoring actor returns: every prediction column plus the error columns,
# which are null for scored rows (and the prediction columns null for errors).
ERROR_COLUMNS = ("error_type", "error_message")


def scored_schema(spec: OutputSpec) -> pa.Schema:
    """Schema of a scoring actor's output batch."""
    schema = predictions_schema(spec)
    for name in ERROR_COLUMNS:
        schema = schema.append(pa.field(name, pa.string()))
    return schema


def split_scored(batch: pa.Table, spec: OutputSpec) -> tuple[pa.Table, pa.Table]:
    """Split an actor's output into (predictions, errors) tables."""
    import pyarrow.compute as pc

    schema = predictions_schema(spec)
    failed = pc.is_valid(batch["error_type"])
    preds = batch.filter(pc.invert(failed)).select(schema.names)
    errs = batch.filter(failed).rename_columns({"scored_at": "failed_at"}).select(ERRORS_SCHEMA.names)
    return preds.cast(schema), errs.cast(ERRORS_SCHEMA)


_DISTINCT = {"uri", "source_etag"}  # string columns whose values (almost) never repeat


def parquet_options(schema: pa.Schema) -> dict:
    """``pq.ParquetWriter`` options for a table of ``schema``: dictionaries and statistics where they help.

    Floating-point values (scores, embeddings), URIs and etags are distinct
    row to row, so a dictionary only fills up before the writer falls back to
    plain encoding: without it the driver wrote DeiT-base's rows several
    times faster and the files were a third smaller (benchmarks/driver_stage.py,
    docs/scale.md). Min/max statistics of a vector's elements prune nothing,
    so vectors have none. Everything else keeps both. Compression is zstd.
    """
    dictionary, statistics = [], []
    for path, leaf, in_vector in _leaves(schema):
        if not pa.types.is_floating(leaf) and path not in _DISTINCT:
            dictionary.append(path)
        if not in_vector:
            statistics.append(path)
    return {"compression": "zstd", "use_dictionary": dictionary, "write_statistics": statistics}


def _leaves(schema: pa.Schema):
    """(Parquet column path, leaf type, whether inside a fixed-size list) of each leaf column."""
    for field in schema:
        path, typ, in_vector = field.name, field.type, False
        while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ):
            # pyarrow's (compliant) nested naming: <name>.list.element
            path, in_vector = f"{path}.list.element", in_vector or pa.types.is_fixed_size_list(typ)
            typ = typ.value_type
        yield path, typ, in_vector


_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model_slug(model_name: str) -> str:
    """A partition-safe name: 'facebook/deit-x' -> 'facebook--deit-x' (as the HF cache does)."""
    return _SLUG_UNSAFE.sub("-", model_name.replace("/", "--")).strip("-") or "model"


def partition_dir(root: str, table: str, model_name: str, run_date: str) -> str:
    """``<root>/<table>/model_slug=<slug>/run_date=<date>``."""
    return f"{root.rstrip('/')}/{table}/model_slug={model_slug(model_name)}/run_date={run_date}"


def table_of(uri: str) -> str:
    """"predictions" or "errors": the table a data file belongs to, from its path."""
    return uri.split("/model_slug=", 1)[0].rsplit("/", 1)[-1]
