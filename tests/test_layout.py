"""Schema, partition layout and the Ray placement guard (plain functions)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.placement import ResourceError, plan_placement
from tasks.schema import (ERRORS_SCHEMA, OutputSpec, model_slug, partition_dir, predictions_schema, scored_schema,
                          split_scored)
from tasks.settings import ScoreSettings


def test_model_slug_and_partition_dir():
    assert model_slug("facebook/deit-base-distilled-patch16-224") == "facebook--deit-base-distilled-patch16-224"
    assert model_slug("we ird:name") == "we-ird-name"
    assert partition_dir("s3://b/out/", "predictions", "a/b", "2026-11-22") == \
        "s3://b/out/predictions/model_slug=a--b/run_date=2026-11-22"


def test_partition_keys_are_not_file_columns():
    names = set(predictions_schema(OutputSpec(8)).names) | set(ERRORS_SCHEMA.names)
    assert not names & {"model_slug", "run_date"}
    assert predictions_schema(OutputSpec(8)).field("embedding").type == pa.list_(pa.float32(), 8)


def test_score_actor_trusts_the_decoded_flag_not_error_type(tiny_checkpoint):
    """Ray hands an all-None error_type column back as NaN: rows must still be scored."""
    import numpy as np
    from PIL import Image

    from tasks.score import BatchContext, ScoringActor

    actor = ScoringActor(model=str(tiny_checkpoint), revision=None, device="cpu", dtype="fp32", top_k=3,
                         storage_options={})
    batch = {"uri": np.array(["a", "b"], object), "decoded": np.array([True, True]),
             "pixel_values": actor.preprocessor([Image.new("RGB", (32, 32), c) for c in ("red", "blue")]),
             "error_type": np.array([np.nan, np.nan]), "error_message": np.array([np.nan, np.nan]),
             "source_size": np.array([1.0, np.nan]), "source_etag": np.array([None, None], object),
             "source_mtime": np.array(["2026-01-01", "NaT"], dtype="datetime64[us]")}
    preds, errs = split_scored(actor.score_batch(batch, BatchContext("r", "m", OutputSpec(64))), OutputSpec(64))
    assert preds.num_rows == 2 and errs.num_rows == 0 and preds["label_ids"].null_count == 0
    assert preds["source_size"].to_pylist() == [1, None] and preds["source_mtime"].null_count == 1


def test_score_actor_that_decodes_its_own_rows_matches_decode_tasks(tiny_checkpoint, photos, tmp_path, monkeypatch):
    """decode_cpus=0: plan rows in, the same rows out as decode_batch followed by the actor."""
    import numpy as np

    from deit_model import host_memory, load_preprocessor
    from tasks.decode import decode_batch
    from tasks.score import BatchContext, ScoringActor

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    uris = [f"file://{p}" for p in sorted(photos.glob("*"))[:3]] + [f"file://{tmp_path / 'broken.jpg'}"]
    plan = {"uri": np.array(uris, object), "source_size": np.arange(4.0), "source_etag": np.array([None] * 4, object),
            "source_mtime": np.array(["2026-01-01"] * 4, dtype="datetime64[us]")}
    decode = {"max_pixels": 10**8, "fast_decode": False, "storage_options": {}}
    monkeypatch.setattr(host_memory, "_done", False)  # as in a fresh actor process
    actor = ScoringActor(model=str(tiny_checkpoint), revision=None, device="cpu", dtype="fp32", top_k=3,
                         storage_options={})
    assert host_memory._done  # the actor's process reuses freed buffers (tests/test_host_memory.py)
    fused = actor.score_batch(dict(plan), BatchContext("r", "m", OutputSpec(64), decode)).drop(["scored_at"])
    decoded = decode_batch(dict(plan), preprocessor=load_preprocessor(str(tiny_checkpoint)), **decode)
    apart = actor.score_batch(decoded, BatchContext("r", "m", OutputSpec(64)))
    apart = apart.drop(["scored_at"])
    assert fused.equals(apart)
    # as decode tasks send them: 8-bit pixels, a quarter of the bytes, normalised by the actor
    decoded8 = decode_batch(dict(plan), preprocessor=load_preprocessor(str(tiny_checkpoint)), uint8=True, **decode)
    assert decoded8["pixel_values"].dtype == np.uint8 and decoded8["pixel_values"].nbytes * 4 == decoded[
        "pixel_values"].nbytes
    assert fused.equals(actor.score_batch(decoded8, BatchContext("r", "m", OutputSpec(64))).drop(["scored_at"]))
    assert fused["error_type"].to_pylist() == [None, None, None, "not_an_image"]
    assert fused["error_message"][3].as_py() == "not a recognised image format (20 bytes, starting b'\\xff\\xd8 not r')"
    assert fused["label_ids"].null_count == 1
    # an actor whose checkpoint is not the run's (reloaded after it changed) scores nothing
    from tasks.plan import CheckpointChanged

    with pytest.raises(CheckpointChanged, match="the run scores with sha256:other"):
        actor.score_batch(dict(plan), BatchContext("r", "m", OutputSpec(64), decode, model_revision="sha256:other"))
    assert actor.score_batch(decoded, BatchContext("r", "m", OutputSpec(64), model_revision=actor.scorer.ref.revision))


def test_preprocessing_that_does_not_split_exactly_is_sent_whole(tiny_checkpoint, photos, caplog):
    """Halves that differ from the whole by one rounding are not used: pixels stay float32, and
    --device-decode, which needs the halves, decodes with PIL instead and says so."""
    import numpy as np
    from PIL import Image

    from deit_model import load_preprocessor
    from tasks.decode import _warn_once, decode_batch

    pre = load_preprocessor(str(tiny_checkpoint))
    normalize = pre.normalize
    pre.normalize = lambda x: normalize(x).nextafter(normalize(x) + 1)  # one ulp off
    assert not pre.splits_exactly()
    paths = sorted(photos.glob("*"))[:2]
    plan = {"uri": np.array([f"file://{p}" for p in paths], object)}
    whole = pre([Image.open(p).convert("RGB") for p in paths])
    _warn_once.cache_clear()  # warned once per process: this test must see it
    for mode in ({"uint8": True}, {"device_jpeg": True}):
        out = decode_batch(plan, preprocessor=pre, max_pixels=10**8, fast_decode=False, storage_options={}, **mode)
        assert out["pixel_values"].dtype == np.float32 and out["decoded"].all() and "jpeg_data" not in out
        np.testing.assert_array_equal(out["pixel_values"], whole)
    assert "decoded by PIL instead" in caplog.text


def test_split_scored_routes_rows():
    schema = scored_schema(OutputSpec(2))
    rows = {n: [None, None] for n in schema.names}
    rows.update(uri=["a", "b"], model=["m", "m"], run_id=["r", "r"], scored_at=[0, 0],
                label_ids=[[1], None], labels=[["x"], None], scores=[[0.5], None],
                embedding=[[1.0, 2.0], None], error_type=[None, "corrupt_image"], error_message=[None, "bad"])
    preds, errs = split_scored(pa.table(rows, schema=schema), OutputSpec(2))
    assert preds["uri"].to_pylist() == ["a"] and errs["uri"].to_pylist() == ["b"]
    assert errs.schema.equals(ERRORS_SCHEMA) and errs["error_type"].to_pylist() == ["corrupt_image"]


def _settings(**kw):
    return ScoreSettings(input="i", output="o", **kw)


def test_placement_cpu_and_gpu():
    assert plan_placement(_settings(), cpus=2, gpus=0).device == "cpu"
    gpu = plan_placement(_settings(num_actors=2, gpus_per_actor=0.5), cpus=16, gpus=1)
    assert gpu.device == "cuda" and gpu.num_gpus == 0.5 and gpu.num_actors == 2
    # what the actors leave is what decode tasks may use (the window per actor follows from it)
    assert gpu.spare_cpus == 16 - 2 * gpu.num_cpus


@pytest.mark.parametrize("kw, cpus, gpus, expected", [
    # unset: on CPU one actor per core, decoding in the actors; on GPUs every GPU, decode tasks on the rest
    ({}, 2, 0, ("cpu", 2, 0.0, 0.0)),
    ({}, 1, 0, ("cpu", 1, 0.0, 0.0)),
    ({}, 16, 2, ("cuda", 2, 1.0, 14.0)),
    (dict(gpus_per_actor=0.5), 16, 1, ("cuda", 2, 1.0, 14.0)),
    (dict(device="cpu"), 16, 2, ("cpu", 16, 0.0, 0.0)),  # GPUs it was told not to use leave it on CPU
    # what is set is kept, and the actors fill what it leaves
    (dict(cpus_per_actor=0.5, decode_cpus=0.5), 2, 0, ("cpu", 3, 0.5, 0.5)),
    (dict(cpus_per_actor=2), 5, 0, ("cpu", 2, 0.0, 1.0)),
    (dict(num_actors=1, decode_cpus=1), 2, 0, ("cpu", 1, 1.0, 1.0)),
    (dict(num_actors=1), 16, 8, ("cuda", 1, 1.0, 15.0)),
])
def test_placement_fills_the_cluster_where_the_layout_is_unset(kw, cpus, gpus, expected):
    p = plan_placement(_settings(**kw), cpus=cpus, gpus=gpus)
    assert (p.device, p.num_actors, p.decode_cpus, p.spare_cpus) == expected


@pytest.mark.parametrize("kw, gpus, expected", [
    ({}, 0, 16),  # unset: the fastest measured for 1-thread CPU actors
    ({}, 1, 128),  # and for GPU actors
    (dict(device="cpu"), 1, 16),  # GPUs it was told not to use: CPU actors' size
    (dict(batch_size=32), 0, 32),  # what is set is kept
    (dict(batch_size=7), 1, 7),
])
def test_batch_size_unset_is_chosen_for_the_actors_device(kw, gpus, expected):
    assert plan_placement(_settings(**kw), cpus=16, gpus=gpus).batch_size == expected


def test_layout_for_gpus_that_have_not_joined_yet_asks_for_one_gpu_actor():
    """device=cuda on a cluster scaled to zero: what the autoscaler is asked for, not one actor per CPU."""
    from tasks.placement import resolve_layout

    assert resolve_layout(_settings(device="cuda"), cpus=8, gpus=0) == (False, 1, 1.0)
    assert resolve_layout(_settings(device="cuda", num_actors=4), cpus=8, gpus=0) == (False, 4, 1.0)


@pytest.mark.parametrize("kw, cpus, gpus, match", [
    (dict(num_actors=2, decode_cpus=1), 2, 0, "need 3 CPUs"),  # would starve decode on 2 CPUs and hang
    (dict(decode_cpus=1, cpus_per_actor=2), 2, 0, "1 actors x 2 CPU \\+ 1 CPU for decoding need 3 CPUs"),
    (dict(num_actors=3, gpus_per_actor=1), 16, 2, "exceed"),
    (dict(device="cuda"), 4, 0, "no GPUs"),
])
def test_placement_refuses_layouts_that_cannot_run(kw, cpus, gpus, match):
    with pytest.raises(ResourceError, match=match):
        plan_placement(_settings(**kw), cpus=cpus, gpus=gpus)


def test_waiting_for_resources_gives_up_with_a_clear_message(ray_cluster):
    """On a cluster that never grows, the autoscaler wait ends in the same refusal, saying it waited."""
    from tasks.placement import await_placement

    assert await_placement(_settings(resource_wait_seconds=5))[1] is False  # fits: no request, no wait
    with pytest.raises(ResourceError, match=r"need 3 CPUs .* after waiting 3 s"):
        await_placement(_settings(num_actors=3, resource_wait_seconds=3))


def test_an_interrupted_wait_for_resources_withdraws_its_request(monkeypatch):
    """Ray keeps an autoscaler request until another replaces it: Ctrl-C must not leave one standing."""
    from tasks import placement

    requests = []
    monkeypatch.setattr(placement, "_request_resources", requests.append)
    monkeypatch.setattr(placement, "cluster_resources", lambda: (2.0, 0.0))

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(placement.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        placement.await_placement(_settings(num_actors=3, resource_wait_seconds=60))
    assert len(requests) == 2 and requests[0] and requests[-1] == []


def test_run_files_are_matched_exactly_by_run_id(tmp_path):
    """Run "nightly" must never claim the files of run "nightly-2" (resume and commit rely on it)."""
    from tasks.commit import moved_files
    from tasks.plan import RunInfo

    part = tmp_path / "predictions" / "model_slug=m" / "run_date=2026-01-01"
    part.mkdir(parents=True)
    for name in ("part-nightly-abc123-00000.parquet", "part-nightly-2-def456-00000.parquet"):
        (part / name).write_bytes(b"x")
    found = moved_files(RunInfo("nightly", "2026-01-01", "", str(tmp_path)))
    assert [f.rsplit("/", 1)[-1] for f in found] == ["part-nightly-abc123-00000.parquet"]


def test_progress_lines_come_every_progress_seconds_and_at_the_end(monkeypatch, caplog):
    from tasks import pipeline
    from tasks.write import WriteResult

    clock = iter([0.0, 1.0, 1.4, 2.1, 2.5, 3.0])  # start, then one batch per tick
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: next(clock))
    events = []
    progress = pipeline._Progress(total=50, every_s=1.0, on_progress=events.append)
    with caplog.at_level("INFO", logger="tasks.pipeline"):
        for done in (10, 20, 30, 40, 50):
            progress.update(WriteResult(scored=done))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    # the first result at 1.0; 1.4 is too soon; 2.1 is a line; 2.5 too soon; the end always
    assert lines[0] == "progress: first 10 images after 1.0 s"
    assert [e.done for e in events] == [10, 30, 50]
    assert events[-1].rate == (50 - 10) / (3.0 - 1.0)
