"""Schema, partition layout and the Ray placement guard (plain functions)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.pipeline import ResourceError, plan_placement
from tasks.schema import ERRORS_SCHEMA, model_slug, partition_dir, predictions_schema, scored_schema, split_scored
from tasks.settings import ScoreSettings


def test_model_slug_and_partition_dir():
    assert model_slug("facebook/deit-base-distilled-patch16-224") == "facebook--deit-base-distilled-patch16-224"
    assert model_slug("we ird:name") == "we-ird-name"
    assert partition_dir("s3://b/out/", "predictions", "a/b", "2026-11-22") == \
        "s3://b/out/predictions/model_slug=a--b/run_date=2026-11-22"


def test_partition_keys_are_not_file_columns():
    names = set(predictions_schema(8).names) | set(ERRORS_SCHEMA.names)
    assert not names & {"model_slug", "run_date"}
    assert predictions_schema(8).field("embedding").type == pa.list_(pa.float32(), 8)


def test_split_scored_routes_rows():
    schema = scored_schema(2)
    rows = {n: [None, None] for n in schema.names}
    rows.update(uri=["a", "b"], model=["m", "m"], run_id=["r", "r"], scored_at=[0, 0],
                label_ids=[[1], None], labels=[["x"], None], scores=[[0.5], None],
                embedding=[[1.0, 2.0], None], error_type=[None, "corrupt_image"], error_message=[None, "bad"])
    preds, errs = split_scored(pa.table(rows, schema=schema), 2)
    assert preds["uri"].to_pylist() == ["a"] and errs["uri"].to_pylist() == ["b"]
    assert errs.schema.equals(ERRORS_SCHEMA) and errs["error_type"].to_pylist() == ["corrupt_image"]


def _settings(**kw):
    return ScoreSettings(input="i", output="o", **kw)


def test_placement_cpu_and_gpu():
    assert plan_placement(_settings(), cpus=2, gpus=0).device == "cpu"
    gpu = plan_placement(_settings(num_actors=2, gpus_per_actor=0.5), cpus=16, gpus=1)
    assert gpu.device == "cuda" and gpu.num_gpus == 0.5


@pytest.mark.parametrize("kw, cpus, gpus, match", [
    (dict(num_actors=2), 2, 0, "need 3 CPUs"),  # would starve decode on 2 CPUs and hang
    (dict(num_actors=3, gpus_per_actor=1), 16, 2, "exceed"),
    (dict(device="cuda"), 4, 0, "no GPUs"),
])
def test_placement_refuses_layouts_that_cannot_run(kw, cpus, gpus, match):
    with pytest.raises(ResourceError, match=match):
        plan_placement(_settings(**kw), cpus=cpus, gpus=gpus)
