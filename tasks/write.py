"""Write scored batches as hive-partitioned, zstd-compressed Parquet files.

Files roll over every ``rows_per_file`` rows so a large run makes a few big
files rather than thousands of small ones; row groups hold up to
``ROW_GROUP_ROWS`` rows so readers can skip and parallelise within a file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .schema import ERRORS_SCHEMA, OutputSpec, partition_dir, predictions_schema, split_scored

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 8192


@dataclass
class WriteResult:
    """What a run wrote: row counts, files and errors grouped by type."""

    scored: int = 0
    failed: int = 0
    files: list[str] = field(default_factory=list)
    errors_by_type: dict[str, int] = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)


class _RollingFile:
    """One table's current Parquet file, started lazily and rolled by row count."""

    def __init__(self, fs, directory: str, schema: pa.Schema, run_id: str, rows_per_file: int):
        self.fs, self.dir, self.schema = fs, directory, schema
        self.run_id, self.rows_per_file = run_id, rows_per_file
        self.seq, self.rows, self.handle, self.writer = 0, 0, None, None
        self.files: list[str] = []

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None:
                self._open()
            take = min(table.num_rows, self.rows_per_file - self.rows)
            self.writer.write_table(table.slice(0, take), row_group_size=ROW_GROUP_ROWS)
            self.rows += take
            table = table.slice(take)
            if self.rows >= self.rows_per_file:
                self.close()

    def _open(self) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)
        path = f"{self.dir}/part-{self.run_id}-{self.seq:05d}.parquet"
        self.handle = self.fs.open(path, "wb")
        self.writer = pq.ParquetWriter(self.handle, self.schema, compression="zstd")
        self.files.append(storage.to_uri(self.fs, path))
        self.seq += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.handle.close()  # for object stores the object appears only now
        self.writer, self.handle, self.rows = None, None, 0


class DatasetWriter:
    """Splits actor output into the predictions and errors tables and writes both."""

    def __init__(self, output: str, *, model_name: str, run_id: str, run_date: str,
                 spec: OutputSpec, rows_per_file: int, storage_options: dict | None = None,
                 metadata: dict[str, str] | None = None):
        fs, root = storage.filesystem(output, storage_options)
        self.spec = spec
        self.result = WriteResult()
        # run facts (model revision, preprocessing) ride along in every file's footer
        extra = {f"deit_scoring.{k}".encode(): v.encode() for k, v in (metadata or {}).items()}
        preds_schema = predictions_schema(spec)
        self.preds = _RollingFile(fs, partition_dir(root, "predictions", model_name, run_date),
                                  preds_schema.with_metadata({**preds_schema.metadata, **extra}),
                                  run_id, rows_per_file)
        self.errors = _RollingFile(fs, partition_dir(root, "errors", model_name, run_date),
                                   ERRORS_SCHEMA.with_metadata({**ERRORS_SCHEMA.metadata, **extra}),
                                   run_id, rows_per_file)

    def write(self, batch: pa.Table) -> None:
        """Write one actor output batch."""
        preds, errs = split_scored(batch, self.spec)
        self.preds.write(preds)
        self.errors.write(errs)
        self.result.scored += preds.num_rows
        self.result.failed += errs.num_rows
        for kind in errs["error_type"].to_pylist():
            self.result.errors_by_type[kind] = self.result.errors_by_type.get(kind, 0) + 1

    def abort(self) -> None:
        """Close and delete every file this writer made: a failed run leaves no parts behind."""
        for rolling in (self.preds, self.errors):
            try:
                rolling.close()
            except Exception:  # noqa: BLE001 - removing the files matters more
                logger.debug("closing %s failed", rolling.dir, exc_info=True)
            for uri in rolling.files:
                try:
                    rolling.fs.rm_file(rolling.fs._strip_protocol(uri))
                except FileNotFoundError:
                    pass

    def close(self) -> WriteResult:
        """Finish all open files and return what was written."""
        self.preds.close()
        self.errors.close()
        self.result.files = self.preds.files + self.errors.files
        return self.result
