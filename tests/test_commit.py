"""The commit's edges, without Ray or Prefect: what a failure after the commit point leaves, and
the writes two processes make of one manifest."""
from __future__ import annotations

import json
import threading

import pyarrow as pa
import pytest

import tasks.commit as commit_mod
from tasks import storage
from tasks.atomic import AtomicWriter
from tasks.plan import RunInfo
from tasks.report import RunSummary, read_manifest, write_manifest
from tasks.schema import OutputSpec
from tasks.write import DatasetWriter

from .test_write import _scored


def _stage(run: RunInfo, uris: range) -> list[str]:
    """One attempt's staged file holding rows for ``uris``; its URI."""
    spec = OutputSpec(8)
    writer = DatasetWriter(run.staging_dir, model_name="m", run_id=run.run_id, run_date=run.run_date, spec=spec,
                           rows_per_file=100)
    rows = _scored(spec, max(uris) + 1, 8).take(list(uris))
    writer.write(rows)
    return writer.close().files


def _staged_run(out, run_id="r1", rows=3) -> tuple[RunInfo, RunSummary]:
    run = RunInfo(run_id, "2026-12-05", "2026-12-05T00:00:00+00:00", str(out))
    files = _stage(run, range(rows))
    summary = RunSummary(run_id, "running", "m", "/in", str(out), run_date=run.run_date, started_at=run.started_at,
                         scored=rows, files=files)
    write_manifest(summary, run)
    return run, summary


def _dataset_uris(out) -> list[str]:
    import duckdb

    return [r[0] for r in duckdb.sql(f"select uri from read_parquet('{out}/predictions/**/*.parquet') "
                                     "order by uri").fetchall()]


def test_a_run_resumed_while_its_first_attempt_lives_commits_each_image_once(tmp_path):
    """Attempt A is still scoring when B resumes the run: B counts the files there when it
    started and its own; A, finding B's claim, stops before its commit; A's later file, which
    holds images B scored too, never reaches the dataset."""
    run = RunInfo("r1", "2026-12-05", "2026-12-05T00:00:00+00:00", str(tmp_path))
    a = commit_mod.claim_run(run)
    a_first = _stage(a, range(0, 3))
    b = commit_mod.claim_run(run)  # B starts: it counts A's first file as done
    assert commit_mod.run_files(b) == a_first
    b_own = _stage(b, range(3, 6))
    a_later = _stage(a, range(3, 6))  # A goes on meanwhile, scoring what B scores
    summary = RunSummary("r1", "running", "m", "/in", str(tmp_path), run_date=run.run_date, started_at=run.started_at)
    write_manifest(summary, run)
    with pytest.raises(commit_mod.RunTakenOver, match="resumed by another attempt"):
        commit_mod.commit(RunSummary(**{**summary.__dict__, "files": a_first + a_later}), a)
    assert not (tmp_path / "predictions").exists()
    done = commit_mod.commit(RunSummary(**{**summary.__dict__, "files": a_first + b_own}), b)
    assert done.status == "committed" and len(done.files) == 2
    assert _dataset_uris(tmp_path) == [f"file:///images/{i:05d}.jpg" for i in range(6)]  # each once
    assert not (tmp_path / "_staging" / "r1").exists()


def test_a_commit_retried_after_a_partial_move_lists_every_file(tmp_path, monkeypatch):
    """Prefect retries the commit step with the score step's summary (staged URIs): the files the
    first try moved must stay in the manifest, or planning would not see their rows."""
    run = RunInfo("r1", "2026-12-05", "2026-12-05T00:00:00+00:00", str(tmp_path))
    files = _stage(run, range(0, 3)) + _stage(run, range(3, 6))
    summary = RunSummary("r1", "running", "m", "/in", str(tmp_path), run_date=run.run_date, files=files)
    real = commit_mod._move
    monkeypatch.setattr(commit_mod, "_move", lambda r, staged, so: real(r, staged[:1], so) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        commit_mod.commit(summary, run)
    monkeypatch.setattr(commit_mod, "_move", real)
    done = commit_mod.commit(summary, run)
    assert done.status == "committed" and len(done.files) == 2
    assert _dataset_uris(tmp_path) == [f"file:///images/{i:05d}.jpg" for i in range(6)]


def test_a_roll_forward_moves_only_the_files_its_manifest_lists(tmp_path, monkeypatch):
    run = RunInfo("r1", "2026-12-05", "2026-12-05T00:00:00+00:00", str(tmp_path))
    a = commit_mod.claim_run(run)
    _stage(a, range(3, 6))  # the earlier attempt's file, which the later one did not count
    b = commit_mod.claim_run(run)
    counted = _stage(b, range(0, 6))
    summary = RunSummary("r1", "running", "m", "/in", str(tmp_path), run_date=run.run_date, files=counted)
    monkeypatch.setattr(commit_mod, "_move", lambda *a: (_ for _ in ()).throw(OSError("died mid-commit")))
    with pytest.raises(OSError):
        commit_mod.commit(summary, b)
    monkeypatch.undo()
    assert commit_mod.roll_forward(str(tmp_path)) == ["r1"]
    assert _dataset_uris(tmp_path) == [f"file:///images/{i:05d}.jpg" for i in range(6)]


def test_a_counted_file_that_is_gone_stops_the_commit(tmp_path):
    run, summary = _staged_run(tmp_path)
    summary.files = summary.files + [summary.files[0].replace("-00000.parquet", "-00001.parquet")]
    with pytest.raises(commit_mod.IncompleteRunError, match="1 of the files run r1 counted are neither"):
        commit_mod.commit(summary, run)
    assert not (tmp_path / "predictions").exists()


def test_a_staging_area_that_cannot_be_deleted_leaves_the_run_committed(tmp_path, monkeypatch, caplog):
    run, summary = _staged_run(tmp_path)

    def refuse(run, storage_options=None):
        raise PermissionError("delete denied")

    monkeypatch.setattr(commit_mod, "discard_staging", refuse)
    done = commit_mod.commit(summary, run)
    assert done.status == "committed" and read_manifest(str(tmp_path), "r1").status == "committed"
    assert len(done.files) == 1 and (tmp_path / done.files[0].split(str(tmp_path) + "/")[1]).exists()
    assert "could not be deleted" in caplog.text


def test_a_commit_retried_after_its_commit_point_keeps_its_time(tmp_path, monkeypatch):
    """Writing it again would give it a later committed_at, past runs committed meanwhile."""
    run, summary = _staged_run(tmp_path)
    first = commit_mod.commit(summary, run)
    monkeypatch.setattr(commit_mod, "write_manifest", lambda *a, **k: pytest.fail("a committed run rewritten"))
    again = commit_mod.commit(summary, run)
    assert again.status == "committed" and again.committed_at == first.committed_at
    assert read_manifest(str(tmp_path), "r1").committed_at == first.committed_at


def _commit_failing_to_write(monkeypatch, summary, run, status: str):
    """commit() with the manifest's write of ``status`` failing (storage gone, a full disk); the real write."""
    real = commit_mod.write_manifest

    def failing(s, r, storage_options=None):
        if s.status == status:
            raise OSError("storage went away")
        return real(s, r, storage_options)

    monkeypatch.setattr(commit_mod, "write_manifest", failing)
    with pytest.raises(OSError):
        commit_mod.commit(summary, run)
    return real


def test_a_failed_commit_point_is_not_recorded_as_failed(tmp_path, monkeypatch):
    """The commit-point write fails: the disk says committing, and the flow's failure record must
    not overwrite it (the next run finishes the commit), nor a committed one."""
    from flows.score_images import _record_failure
    from tasks.settings import ScoreSettings

    run, summary = _staged_run(tmp_path)
    settings = ScoreSettings(input="/in", output=str(tmp_path), model="m", run_id="r1")
    real = _commit_failing_to_write(monkeypatch, summary, run, "committed")
    assert summary.status == "running"  # the caller's: "committing" only once the disk says so
    _record_failure(summary, run, settings, OSError("storage went away"))
    assert read_manifest(str(tmp_path), "r1").status == "committing"
    monkeypatch.setattr(commit_mod, "write_manifest", real)
    assert commit_mod.roll_forward(str(tmp_path)) == ["r1"]
    summary.status = "running"  # as an in-memory summary that missed the commit would be
    _record_failure(summary, run, settings, RuntimeError("after the commit"))
    assert read_manifest(str(tmp_path), "r1").status == "committed"


def test_a_failed_write_of_the_intent_is_recorded_as_failed_not_committing(tmp_path, monkeypatch):
    """The disk still says running: a "committing" kept in memory only made the failure record
    stand down, and no later run finished anything (found in review)."""
    from flows.score_images import _record_failure
    from tasks.settings import ScoreSettings

    run, summary = _staged_run(tmp_path)
    _commit_failing_to_write(monkeypatch, summary, run, "committing")
    _record_failure(summary, run, ScoreSettings(input="/in", output=str(tmp_path), model="m"), OSError("no space"))
    assert read_manifest(str(tmp_path), "r1").status == "failed"


def test_a_retried_score_step_counts_what_was_there_when_its_attempt_claimed_the_run(tmp_path):
    """A retry listing again would count a file another attempt finished meanwhile (found in review)."""
    run = RunInfo("r1", "2026-12-05", "2026-12-05T00:00:00+00:00", str(tmp_path))
    a = commit_mod.claim_run(run)
    first = _stage(a, range(0, 3))
    b = commit_mod.claim_run(run)
    _stage(a, range(3, 6))  # A, still alive, finishes a file after B claimed the run
    assert list(b.earlier) == first


def test_two_writers_of_one_manifest_both_finish_and_leave_whole_json(tmp_path):
    """Two processes finishing one commit both write its manifest (runs.md)."""
    fs, path = storage.filesystem(str(tmp_path / "manifest.json"))
    writers = [AtomicWriter(fs, path) for _ in range(2)]
    assert writers[0].tmp != writers[1].tmp
    for i, w in enumerate(writers):
        w.handle.write(json.dumps({"status": "committed", "writer": i, "pad": "x" * (1000 * i)}).encode())
    threads = [threading.Thread(target=w.close) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "committed"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_planned_image_without_a_row_stops_the_commit():
    from tasks.commit import IncompleteRunError, check_complete

    run = RunInfo("r1", "2026-12-05", "", "/out")
    plan = pa.table({"uri": ["a", "b", "c"]})
    check_complete(plan, pa.table({"uri": ["c", "b", "a", "x"]}), run)
    check_complete(plan.slice(0, 0), pa.table({"uri": pa.array([], pa.string())}), run)
    with pytest.raises(IncompleteRunError, match=r"1 of the 3 planned images .*\(one: b\).*--run-id r1"):
        check_complete(plan, pa.table({"uri": ["a", "c"]}), run)


def test_rerunning_a_committed_run_id_does_nothing_whatever_the_options(tmp_path, caplog):
    """README ("Exit codes"): rerunning a committed --run-id does nothing; other options are named."""
    from flows.score_images import _open
    from tasks.report import public_parameters
    from tasks.settings import ScoreSettings

    settings = ScoreSettings(input="/in", output=str(tmp_path), model="m", run_id="r1", top_k=3)
    run = RunInfo("r1", "2026-12-05", "2026-12-05T00:00:00+00:00", str(tmp_path))
    write_manifest(RunSummary("r1", "committed", "m", "/in", str(tmp_path), run_date=run.run_date,
                              parameters=public_parameters(settings)), run)
    opened, summary, _ = _open(settings.model_copy(update={"top_k": 5}))
    assert opened.run_id == "r1" and summary.status == "committed"
    assert "different top_k; it is committed, so nothing was done" in caplog.text


def test_a_flow_refuses_relative_local_paths():
    """Under a process worker the flow runs in a temporary folder, deleted after the run: a
    relative output was committed there and lost (found in review). The CLI passes absolute ones."""
    from flows.score_images import _refuse_relative_paths
    from tasks.plan import RunRefused
    from tasks.settings import ScoreSettings

    with pytest.raises(RunRefused, match="output 'scores' is a relative path"):
        _refuse_relative_paths(ScoreSettings(input="/data/in", output="scores"))
    with pytest.raises(RunRefused, match="input 'in' is a relative path"):
        _refuse_relative_paths(ScoreSettings(input="in", output="s3://b/scores"))
    _refuse_relative_paths(ScoreSettings(input="s3://b/in", output="/data/scores"))
