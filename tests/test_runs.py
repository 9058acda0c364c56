"""Nightly and ad-hoc runs: incremental, resumable, exactly once, atomic to readers."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest
from PIL import Image

from tasks.history import latest

pytestmark = pytest.mark.slow

# The actors decode (the CPU layout): every run would otherwise start its decode workers,
# each importing torch, about 10 s a run on 2 cores. Decode tasks are covered by
# test_actor_pool.py, test_end_to_end.py and test_cli_runs.py.
FAST = dict(top_k=3, batch_size=4, num_actors=1, cpus_per_actor=0.5, decode_cpus=0.0)


def _run(**params):
    from flows.score_images import score_images

    state = score_images(**params, return_state=True)
    return state, (state.result() if state.is_completed() else state.result(raise_on_failure=False))


def _ok(**params):
    state, summary = _run(**params)
    assert state.is_completed(), state.message
    return summary


def exactly_once(out, run_id: str, expected: list[str]) -> None:
    """Every expected URI once in predictions or errors of ``run_id``: DuckDB and Polars agree."""
    tables = [t for t in ("predictions", "errors") if list((out / t).glob("**/*.parquet"))]
    union = " union all ".join(
        f"select uri from read_parquet('{out}/{t}/**/*.parquet', hive_partitioning=true) where run_id = '{run_id}'"
        for t in tables)
    rows = duckdb.sql(f"select uri, count(*) from ({union}) group by uri").fetchall()
    assert sorted(u for u, _ in rows) == sorted(expected) and all(c == 1 for _, c in rows)
    frames = [pl.read_parquet(f"{out}/{t}/**/*.parquet", hive_partitioning=True).filter(pl.col("run_id") == run_id)
              .select("uri") for t in tables]
    counts = pl.concat(frames).group_by("uri").len()
    assert counts.height == len(expected) and counts["len"].max() == 1
    assert not list(out.glob("**/*.inprogress")) and not list((out / "_staging").glob(f"{run_id}/**/*.parquet"))


def _jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_nightly_runs_score_only_new_and_changed(ray_cluster, prefect_harness, tiny_checkpoint, photos,
                                                 s3fs_client, s3_bucket, s3_server):
    s3fs_client.put(str(photos) + "/", f"{s3_bucket}/in/", recursive=True)
    opts = {"endpoint_url": s3_server}
    common = dict(input=f"s3://{s3_bucket}/in/", output=f"s3://{s3_bucket}/out", model=str(tiny_checkpoint),
                  storage_options=opts, **FAST)
    first = _ok(**common)
    assert (first.new, first.changed, first.skipped, first.scored) == (8, 0, 0, 8)
    second = _ok(**common)
    assert (second.listed, second.new, second.changed, second.skipped, second.scored) == (8, 0, 0, 8, 0)
    assert second.status == "committed" and second.files == []
    s3fs_client.pipe({f"{s3_bucket}/in/new1.jpg": _jpeg("red"), f"{s3_bucket}/in/sub/new2.jpg": _jpeg("blue"),
                      f"{s3_bucket}/in/china.jpg": _jpeg("green")})  # china.jpg changed: new etag
    third = _ok(**common)
    assert (third.listed, third.new, third.changed, third.skipped, third.scored) == (10, 2, 1, 7, 3)
    con = duckdb.connect()
    con.register_filesystem(s3fs_client)
    scored_by_run = dict(con.execute(
        f"select run_id, count(*) from read_parquet('s3://{s3_bucket}/out/predictions/**/*.parquet', "
        "hive_partitioning=true) group by run_id").fetchall())
    assert scored_by_run == {first.run_id: 8, third.run_id: 3}
    newest = latest(common["output"], opts)
    assert newest.num_rows == 10 and set(newest["status"].to_pylist()) == {"scored"}
    assert {r["run_id"] for r in newest.to_pylist() if r["uri"].endswith("china.jpg")} == {third.run_id}


def test_reprocess_failed_and_force(ray_cluster, prefect_harness, tiny_checkpoint, photos, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(photos, src)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    common = dict(input=str(src), output=str(out), model=str(tiny_checkpoint), **FAST)
    first = _ok(**common)
    assert first.failed == 2
    nightly = _ok(**common)  # a corrupt or empty file fails again as it is: not retried every night
    assert (nightly.to_score, nightly.failed_before, nightly.skipped) == (0, 2, 8)
    first_files = {p: p.stat().st_mtime_ns for p in out.glob("predictions/**/*.parquet")}
    (src / "broken.jpg").write_bytes(_jpeg("white"))  # fixed upstream
    retry = _ok(**common, only_failed=first.run_id)
    assert (retry.to_score, retry.scored, retry.failed) == (2, 1, 1)
    exactly_once(out, retry.run_id, [f"file://{src}/broken.jpg", f"file://{src}/empty.png"])
    assert {p: p.stat().st_mtime_ns for p in first_files} == first_files  # older partitions untouched
    view = {r["uri"].rsplit("/", 1)[-1]: r["status"] for r in latest(str(out)).to_pylist()}
    assert view["broken.jpg"] == "scored" and view["empty.png"] == "failed" and len(view) == 10
    again = _ok(**common, only_failed="any")
    assert again.to_score == 1  # only empty.png is still failing in the latest view
    forced = _ok(**common, force=True)
    assert forced.to_score == 10 and forced.scored == 9
    assert {r["run_id"] for r in latest(str(out)).to_pylist()} == {forced.run_id}


def test_error_threshold(ray_cluster, prefect_harness, tiny_checkpoint, photos, tmp_path):
    from tasks.pipeline import ErrorThresholdExceeded

    src = tmp_path / "in"
    shutil.copytree(photos, src)
    for i in range(3):
        (src / f"bad{i}.jpg").write_bytes(b"")
    common = dict(input=str(src), output=str(tmp_path / "out"), model=str(tiny_checkpoint), **FAST)
    state, error = _run(**common, max_failed_fraction=0.2)  # 3 of 11 = 27%
    assert state.is_failed() and isinstance(error, ErrorThresholdExceeded)
    assert "3 of 11 images failed" in str(error) and "empty_object=3" in str(error)
    assert not (tmp_path / "out" / "predictions").exists()  # nothing committed
    (manifest,) = (tmp_path / "out" / "_runs").glob("*/manifest.json")
    recorded = json.loads(manifest.read_text())
    assert recorded["status"] == "failed" and recorded["failed"] == 3  # as its message says
    assert recorded["errors_by_type"] == {"empty_object": 3}
    # its staged files are discarded (a rerun starts the run afresh), not left for a resume to commit
    assert not (tmp_path / "out" / "_staging" / recorded["run_id"]).exists()
    assert not list((tmp_path / "out").glob("_staging/**/*.parquet"))
    ok = _ok(**common, max_failed=3)
    assert ok.status == "committed" and ok.failed == 3


def test_a_resume_scores_with_the_checkpoint_the_run_was_planned_with(ray_cluster, prefect_harness, photos,
                                                                     tmp_path, monkeypatch):
    """A checkpoint directory replaced between attempts is refused: one run's rows, one model."""
    import tasks.write as write_mod
    from deit_model import create_random_checkpoint
    from tasks.plan import CheckpointChanged

    from .conftest import TINY_MODEL, TINY_OVERRIDES

    model, out = tmp_path / "model", tmp_path / "out"
    create_random_checkpoint(TINY_MODEL, model, seed=0, **TINY_OVERRIDES)
    common = dict(input=str(photos), output=str(out), model=str(model), run_id="pinned", rows_per_file=2, **FAST)
    real_write, calls = write_mod.DatasetWriter.write, []

    def fail_second(self, table):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the output failed mid-run")
        return real_write(self, table)

    monkeypatch.setattr(write_mod.DatasetWriter, "write", fail_second)
    assert _run(**common)[0].is_failed()
    monkeypatch.setattr(write_mod.DatasetWriter, "write", real_write)
    planned = json.loads((out / "_runs" / "pinned" / "manifest.json").read_text())["model_revision"]
    shutil.rmtree(model)
    create_random_checkpoint(TINY_MODEL, model, seed=1, **TINY_OVERRIDES)  # retrained in place
    state, error = _run(**common)
    assert state.is_failed() and isinstance(error, CheckpointChanged) and planned in str(error)
    shutil.rmtree(model)
    create_random_checkpoint(TINY_MODEL, model, seed=0, **TINY_OVERRIDES)  # restored: the run resumes
    summary = _ok(**common)
    assert summary.status == "committed" and summary.model_revision == planned
    # the first attempt wrote one batch of 4; the rate counts only what this attempt scored
    assert (summary.scored, summary.attempt_images) == (8, 4)
    revisions = duckdb.sql(f"select distinct model_revision from read_parquet('{out}/predictions/**/*.parquet')")
    assert revisions.fetchall() == [(planned,)]
    exactly_once(out, "pinned", [f"file://{p}" for p in photos.iterdir()])


def test_a_checkpoint_of_another_width_under_a_taken_name_is_refused(ray_cluster, prefect_harness, photos,
                                                                    tiny_checkpoint, tmp_path):
    """Two checkpoints in folders named ``final`` share a partition; their embeddings must fit one schema."""
    from deit_model import create_random_checkpoint
    from tasks.plan import RunRefused, new_run, plan_run
    from tasks.settings import ScoreSettings

    from .conftest import TINY_MODEL, TINY_OVERRIDES

    first, wider, same_width, out = (tmp_path / d / "final" for d in ("a", "b", "c", "out"))
    shutil.copytree(tiny_checkpoint, first)
    create_random_checkpoint(TINY_MODEL, wider, seed=0, **{**TINY_OVERRIDES, "hidden_size": 96})
    create_random_checkpoint(TINY_MODEL, same_width, seed=1, **TINY_OVERRIDES)  # retrained: same width
    common = dict(input=str(photos), output=str(out), limit=2, **FAST)
    assert _ok(**common, model=str(first)).status == "committed"
    state, error = _run(**common, model=str(wider))
    assert state.is_failed() and isinstance(error, RunRefused), state.message
    assert "model_slug=final already holds embeddings of 64 floats" in str(error) and "are 96" in str(error)
    assert not (out / "_staging").exists() or not list((out / "_staging").glob("**/*.parquet"))
    settings = ScoreSettings(**common, model=str(same_width))
    counts = plan_run(settings, new_run(settings), "final", "sha256:another", width=64)
    assert counts.to_score == 2  # another revision of the same width: planned, as before


def test_crash_while_committing_is_rolled_forward(ray_cluster, prefect_harness, tiny_checkpoint, photos,
                                                  tmp_path, monkeypatch):
    import tasks.commit as commit_mod

    out = tmp_path / "out"
    common = dict(input=str(photos), output=str(out), model=str(tiny_checkpoint), rows_per_file=3, **FAST)
    real_move = commit_mod._move

    def crash_after_one(run, staged, storage_options):
        real_move(run, staged[:1], storage_options)
        raise OSError("storage went away mid-commit")

    monkeypatch.setattr(commit_mod, "_move", crash_after_one)
    state, _ = _run(**common, run_id="nightly-crash")
    assert state.is_failed()
    manifest = json.loads((out / "_runs" / "nightly-crash" / "manifest.json").read_text())
    assert manifest["status"] == "committing" and len(manifest["files"]) >= 3
    monkeypatch.setattr(commit_mod, "_move", real_move)
    _ok(**common)  # any later run on this output finishes the interrupted commit first
    manifest = json.loads((out / "_runs" / "nightly-crash" / "manifest.json").read_text())
    assert manifest["status"] == "committed"
    exactly_once(out, "nightly-crash", [f"file://{p}" for p in photos.iterdir()])


def test_a_staged_file_the_listing_misses_fails_the_run_and_loses_nothing(
        ray_cluster, prefect_harness, tiny_checkpoint, photos, tmp_path, monkeypatch):
    """A staged file the listing does not return stops the commit, whose clean-up would delete the
    staging area (the score step counted the file as written; tests/test_commit.py has the check
    that every planned image has a row); a rerun of the id commits them all."""
    import tasks.commit as commit_mod

    out = tmp_path / "out"
    common = dict(input=str(photos), output=str(out), model=str(tiny_checkpoint), rows_per_file=3, **FAST)
    real = commit_mod.staged_files
    monkeypatch.setattr(commit_mod, "staged_files", lambda run, options=None: real(run, options)[1:])
    state, _ = _run(**common, run_id="half-seen")
    assert state.is_failed() and "IncompleteRunError" in state.message and "nothing was committed" in state.message
    manifest = json.loads((out / "_runs" / "half-seen" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and not (out / "predictions").exists()
    assert len(real(commit_mod.RunInfo("half-seen", manifest["run_date"], "", str(out)))) >= 2  # all kept
    monkeypatch.setattr(commit_mod, "staged_files", real)
    assert _ok(**common, run_id="half-seen").status == "committed"
    exactly_once(out, "half-seen", [f"file://{p}" for p in photos.iterdir()])


def _wait_for(predicate, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_killed_actor_is_restarted_and_the_run_completes_exactly_once(ray_cluster, prefect_harness, tiny_checkpoint,
                                                                     tmp_path):
    """SIGKILL the scoring actor mid-run: Ray restarts it and retries its calls (max_restarts,
    max_task_retries), and the run commits every image once without a rerun."""
    import psutil

    from flows.demo import generate_sample_images

    src = tmp_path / "in"
    # the driver receives results one batch (8 rows) at a time: many batches, so the
    # run is still going when the actor is killed
    generate_sample_images(src, 200, seed=3)
    out = tmp_path / "out"
    common = dict(input=str(src), output=str(out), model=str(tiny_checkpoint), run_id="actor-kill",
                  rows_per_file=16, checkpoint_seconds=0.5, **{**FAST, "batch_size": 8})
    result = {}
    worker = threading.Thread(target=lambda: result.update(first=_run(**common)))
    worker.start()

    def actors():
        return [p for p in psutil.process_iter(["cmdline"]) if "ScoringActor" in " ".join(p.info["cmdline"] or [])]

    # kill the scoring actor process while the run is under way (it exists only then)
    assert _wait_for(lambda: bool(actors()) and worker.is_alive()), "no scoring actor process found"
    time.sleep(1.0)
    victims = actors()
    for p in victims:
        p.send_signal(signal.SIGKILL)
    killed_mid_run = bool(victims) and worker.is_alive()
    worker.join(timeout=300)
    assert killed_mid_run
    state, summary = result["first"]
    assert state.is_completed(), state.message
    assert summary.scored + summary.failed == len(list(src.iterdir()))
    exactly_once(out, "actor-kill", [f"file://{p}" for p in src.iterdir()])


def test_killed_flow_process_then_rerun_is_exactly_once(ray_address, prefect_harness, tiny_checkpoint, tmp_path):
    """The whole driver (flow, Prefect, Ray) is SIGKILLed mid-run; the same command then resumes.

    The rerun is the same command in a new process, joined to the session's Ray cluster and
    Prefect server (RAY_ADDRESS, PREFECT_API_URL) so that it does not start both again: what it
    resumes from is on disk, not in either of them.
    """
    from prefect.settings import PREFECT_API_URL

    from flows.demo import generate_sample_images

    src = tmp_path / "in"
    generate_sample_images(src, 80, seed=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--input", str(src), "--output", str(out),
           "--model", str(tiny_checkpoint), "--run-id", "flow-kill", "--rows-per-file", "4",
           "--checkpoint-seconds", "0.5", "--batch-size", "2", "--num-actors", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0"]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "ph"))
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        assert _wait_for(lambda: len(list((out / "_staging").glob("flow-kill/predictions/**/*.parquet"))) >= 2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        first.wait()
    staged_before = len(list((out / "_staging").glob("flow-kill/**/*.parquet")))
    assert staged_before >= 2 and not (out / "predictions").exists()  # nothing visible yet
    env.update(RAY_ADDRESS=ray_address, PREFECT_API_URL=PREFECT_API_URL.value())
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run flow-kill" in second.stderr
    assert f"ray: connected to {ray_address}" in second.stderr  # the session's cluster, not its own
    exactly_once(out, "flow-kill", [f"file://{p}" for p in src.iterdir()])
    manifest = json.loads((out / "_runs" / "flow-kill" / "manifest.json").read_text())
    assert manifest["status"] == "committed" and manifest["attempts"] == 2
    assert manifest["scored"] + manifest["failed"] == 83


def test_reader_during_a_run_sees_the_previous_commit(ray_cluster, prefect_harness, tiny_checkpoint, tmp_path):
    from flows.demo import generate_sample_images

    src = tmp_path / "in"
    generate_sample_images(src, 200, seed=5)  # several 64-row blocks, see the actor test
    out = tmp_path / "out"
    common = dict(input=str(src), output=str(out), model=str(tiny_checkpoint), rows_per_file=16,
                  checkpoint_seconds=0.5, **{**FAST, "batch_size": 8})
    first = _ok(**common, limit=10)
    query = f"select run_id, count(*) from read_parquet('{out}/predictions/**/*.parquet') group by run_id"
    before = duckdb.sql(query).fetchall()
    result, seen = {}, {}
    worker = threading.Thread(target=lambda: result.update(second=_run(**common, run_id="second")))
    worker.start()

    def status():
        path = out / "_runs" / "second" / "manifest.json"
        return json.loads(path.read_text())["status"] if path.exists() else None

    def read_while_scoring():
        # a read counts only if the run was still scoring (not yet moving files into
        # place) before and after it: that is the window a reader must not see into
        if not list((out / "_staging").glob("second/predictions/**/*.parquet")) or status() != "running":
            return False
        during, during_latest = duckdb.sql(query).fetchall(), {r["run_id"] for r in latest(str(out)).to_pylist()}
        if status() != "running":
            return False
        seen.update(during=during, latest=during_latest)
        return True

    assert _wait_for(read_while_scoring)
    during, during_latest = seen["during"], seen["latest"]
    worker.join(timeout=300)
    assert result["second"][0].is_completed()
    assert during == before == [(first.run_id, first.scored)] and during_latest == {first.run_id}
    after = dict(duckdb.sql(query).fetchall())
    assert set(after) == {first.run_id, "second"}
    assert ds.dataset(out / "predictions", partitioning="hive").count_rows() == sum(after.values())
