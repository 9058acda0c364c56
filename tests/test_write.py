"""The staged Parquet files: how columns are encoded, and that every value reads back as written."""
from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.schema import OutputSpec, parquet_options, scored_schema
from tasks.write import DatasetWriter


def _scored(spec: OutputSpec, n: int, dim: int) -> pa.Table:
    """An actor's output batch of ``n`` scored rows with distinct floats, as a model's would be."""
    rng = np.random.default_rng(0)
    value = np.float16 if spec.float16 else np.float32
    now = datetime.now(timezone.utc)
    data = {
        "uri": [f"file:///images/{i:05d}.jpg" for i in range(n)],
        "label_ids": [[int(i % 7), 3] for i in range(n)], "labels": [[f"class_{i % 7}", "class_3"] for i in range(n)],
        "scores": rng.random((n, 2), dtype=np.float32).tolist(), "activation": ["softmax"] * n,
        "embedding": list(rng.standard_normal((n, dim)).astype(value)),
        "token_features": [list(rng.standard_normal((3, dim)).astype(value)) for _ in range(n)],
        "model": ["m"] * n, "model_revision": ["sha256:x"] * n, "run_id": ["r"] * n, "scored_at": [now] * n,
        "source_size": list(range(n)), "source_etag": [f"{i:032x}" for i in range(n)], "source_mtime": [now] * n,
        "error_type": [None] * n, "error_message": [None] * n,
    }
    return pa.table(data, schema=scored_schema(spec))


def test_floats_and_unique_strings_skip_dictionaries_and_vectors_statistics(tmp_path):
    spec, dim, n = OutputSpec(8, float16=True, token_features=True), 8, 300
    batch = _scored(spec, n, dim)
    writer = DatasetWriter(str(tmp_path), model_name="m", run_id="r", run_date="2026-12-02", spec=spec,
                           rows_per_file=1000)
    writer.write(batch)
    [path] = writer.close().files
    meta = pq.ParquetFile(path.removeprefix("file://")).metadata.row_group(0)
    chunks = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    # the options name real columns: a name pyarrow does not know would be ignored silently
    named = parquet_options(pq.read_schema(path.removeprefix("file://")))
    assert set(named["write_statistics"]) | set(named["use_dictionary"]) <= set(chunks)
    plain = {"uri", "source_etag", "scores.list.element", "embedding.list.element",
             "token_features.list.element.list.element"} & set(chunks)
    assert len(plain) == 5
    for name, chunk in chunks.items():
        assert ("RLE_DICTIONARY" in chunk.encodings) == (name not in plain), name
    assert not chunks["embedding.list.element"].is_stats_set and not chunks[
        "token_features.list.element.list.element"].is_stats_set
    assert chunks["uri"].is_stats_set and chunks["uri"].statistics.min == "file:///images/00000.jpg"
    # every value back, through pyarrow and DuckDB
    back = pq.read_table(path.removeprefix("file://"))
    assert back.equals(batch.select(back.column_names).cast(back.schema))
    emb = duckdb.sql(f"select embedding from read_parquet('{path.removeprefix('file://')}') order by uri").fetchall()
    np.testing.assert_array_equal(np.array([r[0] for r in emb], dtype=np.float16),
                                  np.stack(batch["embedding"].to_pylist()).astype(np.float16))


def test_an_aborted_object_store_write_never_publishes_what_was_written(s3fs_client, s3_bucket):
    """gcsfs and adlfs handles keep fsspec's do-nothing discard(): closing one, or letting the
    garbage collector close it, would finish the upload with the part written so far."""
    import gc

    from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

    from tasks.atomic import AtomicWriter

    store: dict[str, bytes] = {}

    class BufferedFile(AbstractBufferedFile):  # uploads in chunks; the object appears on the final one
        def _initiate_upload(self):
            self.parts = []

        def _upload_chunk(self, final=False):
            self.parts.append(self.buffer.getvalue())
            if final:
                store[self.path] = b"".join(self.parts)
            return True

    class ChunkedStore(AbstractFileSystem):
        protocol = "chunked"

        def _open(self, path, mode="rb", **kwargs):
            return BufferedFile(self, path, mode, block_size=5)

    for fs, path in ((ChunkedStore(), "bucket/_runs/r/manifest.json"), (s3fs_client, f"{s3_bucket}/manifest.json")):
        writer = AtomicWriter(fs, path)
        writer.handle.write(b'{"run_id": "r", "sta')  # then the write fails: write_atomic aborts
        writer.abort()
        del writer
        gc.collect()
        assert not store
        assert fs is not s3fs_client or not s3fs_client.exists(path)


def test_many_small_batches_make_few_large_row_groups(tmp_path, monkeypatch):
    """Actors send 32-row batches; each write_table call ends a row group, so they are gathered first."""
    import tasks.write as write_mod

    monkeypatch.setattr(write_mod, "ROW_GROUP_ROWS", 100)  # 8192 in a run; small here, same logic
    spec = OutputSpec(8)
    batch = _scored(spec, 32, 8)
    writer = DatasetWriter(str(tmp_path), model_name="m", run_id="r", run_date="2026-12-02", spec=spec,
                           rows_per_file=250)
    for _ in range(20):  # 640 rows: files of 250, 250 and 140
        writer.write(batch)
    files = [f.removeprefix("file://") for f in writer.close().files]
    groups = [[pq.ParquetFile(f).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(f).num_row_groups)]
              for f in sorted(files)]
    assert sorted(sum(g) for g in groups) == [140, 250, 250]
    assert all(n <= 100 for g in groups for n in g) and sum(len(g) for g in groups) <= 9  # not 20+ of 32 rows
    # a batch far larger than the pending bound is written at once, in row groups of the bound
    monkeypatch.setattr(write_mod, "ROW_GROUP_BYTES", 1)
    one = DatasetWriter(str(tmp_path / "b"), model_name="m", run_id="r", run_date="2026-12-02", spec=spec,
                        rows_per_file=1000)
    one.write(_scored(spec, 300, 8))
    assert one.tables["predictions"].pending_rows == 0
    [path] = one.close().files
    assert pq.ParquetFile(path.removeprefix("file://")).metadata.num_rows == 300


def test_a_file_that_cannot_be_finished_leaves_nothing_open(tmp_path, monkeypatch):
    """If finishing the predictions file fails, the errors file is aborted, not left to the collector."""
    import pytest

    from tasks import atomic

    spec = OutputSpec(8)
    batch = _scored(spec, 4, 8)
    errors = batch.slice(0, 2).set_column(batch.schema.get_field_index("error_type"), "error_type",
                                          pa.array(["corrupt_image"] * 2))
    writer = DatasetWriter(str(tmp_path), model_name="m", run_id="r", run_date="2026-12-02", spec=spec,
                           rows_per_file=1000)
    writer.write(pa.concat_tables([batch.slice(2), errors]))
    real_close, aborted = atomic.AtomicWriter.close, []
    real_abort = atomic.AtomicWriter.abort

    def failing_close(self):
        if "predictions" in self.path:
            raise OSError("the store refused the upload")
        return real_close(self)

    monkeypatch.setattr(atomic.AtomicWriter, "close", failing_close)
    monkeypatch.setattr(atomic.AtomicWriter, "abort", lambda self: aborted.append(self.path) or real_abort(self))
    with pytest.raises(OSError, match="refused"):
        writer.close()
    assert sorted("errors" in p for p in aborted) == [False, True]  # both aborted
    assert not list(tmp_path.glob("**/*.parquet")) and not list(tmp_path.glob("**/*.inprogress"))
