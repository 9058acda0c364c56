"""The whole path under Prefect and a real 2-CPU Ray cluster, read back as users do."""
from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from tasks.enumerate import list_images

pytestmark = pytest.mark.slow

TOP_K = 3


def _run_flow(**params):
    from flows.score_images import score_images

    state = score_images(**params, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def _reference_topk(ckpt, images):
    proc = AutoImageProcessor.from_pretrained(ckpt)
    model = AutoModelForImageClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        probs = model(**proc(images, return_tensors="pt")).logits.softmax(-1)
    scores, ids = probs.topk(TOP_K)
    return ids.numpy(), scores.numpy()


def _check_output(read_dataset, listed, ckpt, load_bytes, summary):
    preds, errs = read_dataset("predictions"), read_dataset("errors")
    pred_uris, err_uris = preds["uri"].to_pylist(), errs["uri"].to_pylist()
    for column in ("label_ids", "labels", "scores", "embedding", "activation"):
        assert preds[column].null_count == 0, column
    # every listed image exactly once, in predictions or in errors
    assert sorted(pred_uris + err_uris) == sorted(listed)
    assert len(set(pred_uris)) == len(pred_uris) and not set(pred_uris) & set(err_uris)
    assert summary.scored == len(pred_uris) and summary.failed == len(err_uris)
    assert set(errs["error_type"].to_pylist()) == {"corrupt_image", "empty_object", "not_an_image"}
    assert all(m for m in errs["error_message"].to_pylist())
    rows = preds.to_pylist()
    for row in rows:
        assert len(row["label_ids"]) == len(row["labels"]) == len(row["scores"]) == TOP_K
        assert row["scores"] == sorted(row["scores"], reverse=True) and sum(row["scores"]) <= 1 + 1e-6
        assert len(row["embedding"]) == 64 and row["activation"] == "softmax"
        assert row["run_id"] == summary.run_id and row["model"] == ckpt.name
    # top-k equal to what the transformers model gives on the same image
    images = [Image.open(io.BytesIO(load_bytes(r["uri"]))).convert("RGB") for r in rows]
    ref_ids, ref_scores = _reference_topk(ckpt, images)
    np.testing.assert_array_equal(np.array([r["label_ids"] for r in rows]), ref_ids)
    np.testing.assert_allclose(np.array([r["scores"] for r in rows]), ref_scores, atol=1e-5)
    return preds


def test_local_directory_end_to_end(ray_cluster, prefect_harness, tiny_checkpoint, image_dir, tmp_path):
    out = tmp_path / "out"
    summary = _run_flow(input=str(image_dir), output=str(out), model=str(tiny_checkpoint), top_k=TOP_K,
                        batch_size=4, num_actors=1, cpus_per_actor=0.5, decode_cpus=0.5, rows_per_file=100)
    listed = [o.uri for o in list_images(str(image_dir))]
    assert summary.listed == len(listed) and summary.status == "committed"

    def read(table):
        return ds.dataset(out / table, partitioning="hive").to_table()

    preds = _check_output(read, listed, tiny_checkpoint, lambda uri: open(uri[len("file://"):], "rb").read(),
                          summary)
    # DuckDB, as the README documents it
    q = f"select * from read_parquet('{out}/predictions/**/*.parquet', hive_partitioning=true)"
    duck = duckdb.sql(f"select uri, model_slug, run_date, len(embedding) as d, scores[1] as s from ({q})").fetchall()
    assert len(duck) == preds.num_rows
    assert {r[1] for r in duck} == {"ckpt-tiny"} and all(r[3] == 64 for r in duck)
    by_uri = {r["uri"]: r["scores"][0] for r in preds.to_pylist()}
    assert all(abs(by_uri[u] - s) < 1e-7 for u, _, _, _, s in duck)
    # Polars, and every URI exactly once across both tables
    pl_preds = pl.read_parquet(f"{out}/predictions/**/*.parquet", hive_partitioning=True)
    pl_errs = pl.read_parquet(f"{out}/errors/**/*.parquet", hive_partitioning=True)
    both = pl.concat([pl_preds.select("uri"), pl_errs.select("uri")])
    assert both.height == len(listed) and both["uri"].n_unique() == len(listed)
    assert pl_preds.schema["embedding"] == pl.Array(pl.Float32, 64)
    # the run manifest
    manifest = json.loads((out / "_runs" / summary.run_id / "manifest.json").read_text())
    assert manifest["status"] == "committed" and manifest["listed"] == len(listed)
    assert "storage_options" not in manifest["parameters"]
    # a row traces to the exact weights and preprocessing that made it
    revision = preds["model_revision"].unique().to_pylist()
    assert revision == [manifest["model_revision"]] and revision[0].startswith("sha256:")
    assert manifest["preprocessing"]["size"] == {"height": 256, "width": 256}
    footer = ds.dataset(out / "predictions", partitioning="hive").schema.metadata
    assert json.loads(footer[b"deit_scoring.preprocessing"]) == manifest["preprocessing"]
    assert footer[b"deit_scoring.model_revision"].decode() == revision[0]


def test_s3_input_and_output_end_to_end(ray_cluster, prefect_harness, tiny_checkpoint, image_dir, s3fs_client,
                                        s3_bucket, s3_server):
    s3fs_client.put(str(image_dir) + "/", f"{s3_bucket}/images/", recursive=True)
    opts = {"endpoint_url": s3_server}
    inp, out = f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/scores"
    # decode_cpus=0: the actor reads from S3 and decodes itself (the CPU layout); the local test
    # above covers separate decode tasks, so both paths meet the same reference checks. With
    # --device-decode the actor's torchvision decodes the JPEGs (exact on a CPU for this checkpoint)
    summary = _run_flow(input=inp, output=out, model=str(tiny_checkpoint), top_k=TOP_K, batch_size=8,
                        num_actors=1, cpus_per_actor=1, decode_cpus=0, storage_options=opts, device_decode=True)
    listed = [o.uri for o in list_images(inp, opts)]
    assert summary.listed == len(listed) > 10

    def read(table):
        return ds.dataset(f"{s3_bucket}/scores/{table}", filesystem=s3fs_client, partitioning="hive").to_table()

    def load(uri):
        return s3fs_client.cat_file(uri)

    preds = _check_output(read, listed, tiny_checkpoint, load, summary)
    con = duckdb.connect()
    con.register_filesystem(s3fs_client)
    n = con.execute(f"select count(*) from read_parquet('{out}/predictions/**/*.parquet', "
                "hive_partitioning=true)").fetchone()[0]
    assert n == preds.num_rows
    assert all(f.startswith("s3://") for f in summary.files)
    footer = ds.dataset(f"{s3_bucket}/scores/predictions", filesystem=s3fs_client, partitioning="hive").schema.metadata
    assert footer[b"deit_scoring.device_decode"] == b"true" and footer[b"deit_scoring.fast_decode"] == b"false"


def test_empty_input_completes_with_nothing_written(ray_cluster, prefect_harness, tiny_checkpoint, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    summary = _run_flow(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_checkpoint))
    assert summary.listed == 0 and summary.scored == 0 and "no images" in summary.message
    assert not (tmp_path / "out" / "predictions").exists()


def test_failed_run_leaves_a_failed_manifest_and_no_parts(ray_cluster, prefect_harness, tiny_checkpoint,
                                                          image_dir, tmp_path):
    import shutil

    from flows.score_images import score_images

    broken = tmp_path / "broken-ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # actors cannot load it
    out = tmp_path / "out"
    state = score_images(input=str(image_dir / "photos"), output=str(out), model=str(broken),
                         num_actors=1, cpus_per_actor=0.5, decode_cpus=0.5, return_state=True)
    assert state.is_failed()
    (manifest_path,) = (out / "_runs").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "failed" and manifest["message"]
    assert not list(out.glob("predictions/**/*.parquet")) and not list(out.glob("errors/**/*.parquet"))


def test_timm_cait_with_token_features_and_float16(ray_cluster, prefect_harness, image_dir, tmp_path):
    """A timm checkpoint through the whole pipeline: timm's preprocessing, float16 storage, tokens."""
    pytest.importorskip("timm")
    import timm
    from safetensors.torch import load_file

    from deit_model import create_random_timm_checkpoint

    args = dict(depth=2, embed_dim=48, num_heads=2, depth_token_only=1)
    ckpt = create_random_timm_checkpoint("cait_m36_384.fb_dist_in1k", tmp_path / "cait", **args)
    out = tmp_path / "out"
    _run_flow(input=str(image_dir / "photos"), output=str(out), model=str(ckpt), top_k=TOP_K, batch_size=4,
              num_actors=1, cpus_per_actor=0.5, decode_cpus=0.5, token_features=True, embedding_dtype="float16")
    table = ds.dataset(out / "predictions", partitioning="hive").to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 48)
    assert table.schema.field("token_features").type == pa.list_(pa.list_(pa.float16(), 48))
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert all(len(r["token_features"]) == 577 for r in rows)  # 576 patches + class token at 384
    # the same images through timm's own recipe
    model = timm.create_model("cait_m36_384.fb_dist_in1k", pretrained=False, **args).eval()
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    x = torch.stack([transform(Image.open(r["uri"][len("file://"):]).convert("RGB")) for r in rows])
    with torch.no_grad():
        feats = model.forward_features(x)
        scores, ids = model.forward_head(feats).softmax(-1).topk(TOP_K)
        emb = model.forward_head(feats, pre_logits=True)
    np.testing.assert_array_equal(np.array([r["label_ids"] for r in rows]), ids.numpy())
    np.testing.assert_allclose(np.array([r["scores"] for r in rows]), scores.numpy(), atol=1e-5)
    ours = np.array([r["embedding"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(ours, emb.numpy(), rtol=2e-3, atol=2e-3)  # float16 storage
    # DuckDB reads float16 as FLOAT, Polars natively
    q = f"select len(token_features) n, embedding from read_parquet('{out}/predictions/**/*.parquet', hive_partitioning=true)"
    assert {r[0] for r in duckdb.sql(q).fetchall()} == {577}
    assert pl.read_parquet(f"{out}/predictions/**/*.parquet", hive_partitioning=True).schema["embedding"] == \
        pl.Array(pl.Float16, 48)
