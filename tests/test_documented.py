"""Documented behaviours that had no test: exit 3, `runs`, --fast-decode, --only-failed, fp16 on
CPU, object stores' listing cache and --max-bytes (README "Exit codes", docs/models.md,
docs/runs.md, docs/output.md)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import EXIT_OK, EXIT_TOO_MANY_ERRORS
from tasks.settings import ScoreSettings

from .test_cli import _run as _cli_run
from .test_runs import FAST, _ok  # one actor that decodes its own images, no decode workers

FAST_ARGV = ["--top-k", "3", "--batch-size", "4", "--num-actors", "1", "--cpus-per-actor", "0.5",
             "--decode-cpus", "0"]


@pytest.fixture(scope="module")
def committed(tmp_path_factory, ray_cluster, prefect_harness, tiny_checkpoint, photos):
    """One real committed run: 2 photos scored, an empty file and a non-image failed."""
    root = tmp_path_factory.mktemp("committed")
    src, out = root / "in", root / "out"
    src.mkdir()
    for name in ("china.jpg", "chelsea.png"):
        shutil.copy(photos / name, src / name)
    (src / "empty.jpg").write_bytes(b"")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    summary = _ok(input=str(src), output=str(out), model=str(tiny_checkpoint), run_id="nightly-1", **FAST)
    assert (summary.status, summary.listed, summary.scored, summary.failed) == ("committed", 4, 2, 2)
    return src, out, summary


# 2. `score-images runs`: the runs with their counts, and one run's manifest as JSON

@pytest.mark.slow
def test_runs_lists_runs_with_counts_and_prints_one_manifest(capsys, committed):
    src, out, summary = committed
    code, stdout, _ = _cli_run(capsys, "runs", "--output", str(out))
    assert code == EXIT_OK
    header, *rows = stdout.strip().splitlines()
    assert header.split() == ["run_id", "status", "started_at", "listed", "scored", "failed", "model"]
    (row,) = [r for r in rows if r.split()[0] == "nightly-1"]
    assert row.split() == ["nightly-1", "committed", summary.started_at, "4", "2", "2", summary.model]

    code, stdout, _ = _cli_run(capsys, "runs", "--output", str(out), "--run-id", "nightly-1")
    assert code == EXIT_OK
    record = json.loads(stdout)
    assert record["run_id"] == "nightly-1" and record["status"] == "committed"
    assert (record["listed"], record["scored"], record["failed"]) == (4, 2, 2)
    assert record["errors_by_type"] == {"empty_object": 1, "not_an_image": 1}
    assert record["input"] == str(src) and record["output"] == str(out) and record["model"] == summary.model
    assert record["model_revision"] == summary.model_revision and record["model_revision"].startswith("sha256:")
    assert sorted(record["files"]) == sorted(summary.files) and len(record["files"]) >= 2
    assert record["parameters"]["top_k"] == 3 and "storage_options" not in record["parameters"]
    assert record == json.loads((out / "_runs" / "nightly-1" / "manifest.json").read_text())


# 3. --fast-decode: JPEG draft decoding at min_decode_side(), and the setting reaches the decode

def _large_jpeg(photos, path):
    """A 2000x1500 JPEG with real detail (a photo upscaled), so a reduced decode changes pixels."""
    Image.open(photos / "china.jpg").convert("RGB").resize((2000, 1500), Image.BICUBIC).save(path, "JPEG",
                                                                                              quality=92)
    return path.read_bytes()


def test_fast_decode_drafts_large_jpegs_and_exact_decode_is_pils(photos, tiny_checkpoint, tmp_path):
    from deit_model import decode_image, load_preprocessor
    from deit_model.decode import DEFAULT_MAX_PIXELS
    from tasks.decode import decode_batch

    data = _large_jpeg(photos, tmp_path / "big.jpg")
    exact = decode_image(data)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    assert exact.size == (2000, 1500) and np.array_equal(np.asarray(exact), np.asarray(pil))
    drafted = decode_image(data, draft_side=256)
    assert drafted.size == (500, 375)  # 1/4 scale: the smallest that keeps both sides >= 256
    small = decode_image((photos / "china.jpg").read_bytes(), draft_side=256)  # 640x427 < 2 x 256: not reduced
    assert np.array_equal(np.asarray(small), np.asarray(Image.open(photos / "china.jpg").convert("RGB")))

    pre = load_preprocessor(str(tiny_checkpoint))
    assert pre.min_decode_side() == 256  # distilled 224 (docs/models.md)
    batch = {"uri": np.array([f"file://{tmp_path / 'big.jpg'}"], dtype=object)}
    common = dict(preprocessor=pre, max_pixels=DEFAULT_MAX_PIXELS, storage_options={})
    slow = decode_batch(batch, fast_decode=False, **common)
    fast = decode_batch(batch, fast_decode=True, **common)
    assert slow["decoded"].all() and fast["decoded"].all()
    assert np.array_equal(slow["pixel_values"], np.asarray(pre([exact])))
    assert np.array_equal(fast["pixel_values"], np.asarray(pre([drafted])))
    assert np.abs(fast["pixel_values"] - slow["pixel_values"]).mean() > 1e-3  # pixels differ


@pytest.mark.slow
def test_fast_decode_setting_reaches_the_actors_decode(ray_cluster, prefect_harness, tiny_checkpoint, photos,
                                                       tmp_path):
    from deit_model import create_scorer, decode_image, load_preprocessor

    src = tmp_path / "in"
    src.mkdir()
    data = _large_jpeg(photos, src / "big.jpg")
    pre = load_preprocessor(str(tiny_checkpoint))
    scorer = create_scorer(str(tiny_checkpoint), top_k=3, device="cpu", dtype="fp32")
    expected = {fast: scorer.score(np.asarray(pre([decode_image(data, draft_side=256 if fast else None)])))
                .embedding[0] for fast in (False, True)}
    for fast in (False, True):
        out = tmp_path / f"out-{fast}"
        _ok(input=str(src), output=str(out), model=str(tiny_checkpoint), fast_decode=fast, **FAST)
        (part,) = (out / "predictions").glob("**/*.parquet")
        assert pq.read_metadata(part).metadata[b"deit_scoring.fast_decode"] == str(fast).lower().encode()
        (embedding,) = ds.dataset(out / "predictions", partitioning="hive").to_table()["embedding"].to_pylist()
        np.testing.assert_allclose(embedding, expected[fast], rtol=0, atol=1e-4)
        assert not np.allclose(embedding, expected[not fast], rtol=0, atol=1e-3)


# 4. --only-failed RUN_ID: only a committed run, and it wins over --force

@pytest.mark.slow
def test_only_failed_needs_a_committed_run_and_wins_over_force(committed, tmp_path):
    from tasks.enumerate import read_plan
    from tasks.plan import RunInfo, RunRefused, new_run, plan_run
    from tasks.report import RunSummary, public_parameters, write_manifest

    src, shared, summary = committed
    out = tmp_path / "out"
    shutil.copytree(shared, out)  # its manifest names the committed files where they are
    model, revision = summary.model, summary.model_revision
    for run_id, status in (("crashed", "failed"), ("still-going", "running"), ("half-moved", "committing")):
        write_manifest(RunSummary(run_id, status, model, str(src), str(out), model_revision=revision,
                                  run_date=summary.run_date, started_at=summary.started_at,
                                  files=summary.files), RunInfo(run_id, summary.run_date, "", str(out)))
    base = ScoreSettings(input=str(src), output=str(out), model=model)

    def plan(**kw):
        settings = base.model_copy(update=kw)
        run = new_run(settings)
        counts = plan_run(settings, run, model, revision)
        return counts, sorted(u.rsplit("/", 1)[-1] for u in read_plan(run.plan_uri)["uri"].to_pylist())

    failed = ["broken.jpg", "empty.jpg"]
    assert plan(only_failed="nightly-1")[1] == failed
    counts, planned = plan(only_failed="nightly-1", force=True)
    assert planned == failed and (counts.listed, counts.to_score, counts.skipped) == (4, 2, 2)
    assert plan(force=True)[1] == sorted(failed + ["china.jpg", "chelsea.png"])
    for run_id in ("crashed", "still-going", "half-moved", "no-such-run"):
        with pytest.raises(RunRefused, match=f"no committed run '{run_id}' of model"):
            plan(only_failed=run_id)
        with pytest.raises(RunRefused, match=f"no committed run '{run_id}'"):
            plan(only_failed=run_id, force=True)


# 5. --dtype fp16 on CPU: supported (docs/agreement.md, "CPU bf16 / fp16"); weights cast, outputs fp32

def test_fp16_scores_on_cpu(tiny_checkpoint, photos):
    import torch

    from deit_model import create_scorer, load_preprocessor

    assert ScoreSettings(input="i", output="o", dtype="fp16").dtype == "fp16"
    images = [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]
    px = load_preprocessor(str(tiny_checkpoint))(images)
    fp32 = create_scorer(str(tiny_checkpoint), top_k=3, device="cpu", dtype="fp32").score(px)
    half = create_scorer(str(tiny_checkpoint), top_k=3, device="cpu", dtype="fp16")
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    assert {p.dtype for p in half.model.module.parameters()} == {torch.float16}  # heads included
    low = half.score(px)
    assert low.scores.dtype == np.float32 and low.embedding.dtype == np.float32
    assert np.isfinite(low.scores).all() and np.isfinite(low.embedding).all()
    assert not np.array_equal(low.embedding, fp32.embedding)  # really computed in fp16
    cos = (fp32.embedding * low.embedding).sum(1) / (
        np.linalg.norm(fp32.embedding, axis=1) * np.linalg.norm(low.embedding, axis=1))
    assert cos.min() > 0.999
    np.testing.assert_allclose(low.scores, fp32.scores, atol=0.02)


# 6. Object stores' listing cache is off by default; "use_listings_cache": true turns it back on

def _listed(uri, options):
    from tasks.enumerate import list_images

    return sorted(o.uri.rsplit("/", 1)[-1] for o in list_images(uri, options))


def test_object_store_listings_are_fresh_unless_the_cache_is_asked_for(s3fs_client, s3_bucket, s3_server):
    from tasks.storage import filesystem

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "JPEG")
    for prefix, options, second in (
        ("default", {"endpoint_url": s3_server}, ["a.jpg", "b.jpg"]),
        ("cached", {"endpoint_url": s3_server, "use_listings_cache": True}, ["a.jpg"]),
    ):
        uri = f"s3://{s3_bucket}/{prefix}/"
        s3fs_client.pipe(f"{s3_bucket}/{prefix}/a.jpg", buf.getvalue())
        assert _listed(uri, options) == ["a.jpg"]
        s3fs_client.pipe(f"{s3_bucket}/{prefix}/b.jpg", buf.getvalue())  # added by another writer
        assert _listed(uri, options) == second, prefix
        assert filesystem(uri, options)[0].dircache.use_listings_cache is (prefix == "cached")


# 7. --max-bytes: an object larger as listed is an error row, not read, and the run goes on

def test_objects_over_max_bytes_become_error_rows_and_the_rest_is_scored(committed, tiny_checkpoint, tmp_path):
    src, _, _ = committed
    limit = (src / "chelsea.png").stat().st_size - 1
    assert (src / "china.jpg").stat().st_size <= limit  # the other photo is under it
    summary = _ok(input=str(src), output=str(tmp_path / "out"), model=str(tiny_checkpoint), max_bytes=limit, **FAST)
    assert (summary.scored, summary.failed) == (1, 3)
    errors = ds.dataset(tmp_path / "out" / "errors", partitioning="hive").to_table().to_pylist()
    (row,) = [r for r in errors if r["uri"].endswith("/chelsea.png")]
    assert row["error_type"] == "too_many_bytes" and f"over the limit of {limit:,}" in row["error_message"]
    out = str(tmp_path / "out")
    again = _ok(input=str(src), output=out, model=str(tiny_checkpoint), max_bytes=limit, **FAST)
    assert (again.to_score, again.failed_before) == (0, 3)  # lasting, as too_many_pixels: not retried nightly
    raised = _ok(input=str(src), output=out, model=str(tiny_checkpoint), only_failed="any", **FAST)
    assert (raised.scored, raised.failed) == (1, 2)  # the documented way back: the limit raised, --only-failed


# 1. README "Exit codes": 3 when more images fail than --max-failed allows. Last in this module: `run`
# under capsys leaves Prefect's console handler on capsys's stream, closed after the test, and the
# flows run after it here would log "--- Logging error ---" noise (harmless) to the real stderr.

@pytest.mark.slow
def test_too_many_failed_images_exit_3_with_one_error_line(capsys, ray_cluster, prefect_harness, tiny_checkpoint,
                                                            tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"empty{i}.jpg").write_bytes(b"")
    code, stdout, err = _cli_run(capsys, "run", "--input", str(src), "--output", str(out), "--model",
                             str(tiny_checkpoint), "--run-id", "too-many", "--max-failed", "0", *FAST_ARGV)
    assert code == EXIT_TOO_MANY_ERRORS == 3
    (line,) = [line for line in err.splitlines() if line.startswith("score-images:")]
    assert line.startswith("score-images: run too-many failed: 3 of 3 images failed (100.0%), over the limit of 0")
    assert "empty_object=3" in line and "Nothing was committed" in line
    assert "(--max-failed=0, --max-failed-fraction=None)" in line  # the options' spelling, as a refusal's
    assert "committed" not in stdout  # no summary
    assert not (out / "predictions").exists() and not (out / "errors").exists()
    assert json.loads((out / "_runs" / "too-many" / "manifest.json").read_text())["status"] == "failed"
