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


def _staged_run(out, run_id="r1", rows=3) -> tuple[RunInfo, RunSummary]:
    run = RunInfo(run_id, "2026-12-05", "2026-12-05T00:00:00+00:00", str(out))
    spec = OutputSpec(8)
    writer = DatasetWriter(run.staging_dir, model_name="m", run_id=run_id, run_date=run.run_date, spec=spec,
                           rows_per_file=10)
    writer.write(_scored(spec, rows, 8))
    result = writer.close()
    summary = RunSummary(run_id, "running", "m", "/in", str(out), run_date=run.run_date, started_at=run.started_at,
                         scored=result.scored)
    write_manifest(summary, run)
    return run, summary


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


def test_a_failed_commit_point_is_not_recorded_as_failed(tmp_path, monkeypatch):
    """The commit-point write fails: the disk says committing, and the flow's failure record must
    not overwrite it (the next run finishes the commit), nor a committed one."""
    from flows.score_images import _record_failure
    from tasks.settings import ScoreSettings

    run, summary = _staged_run(tmp_path)
    settings = ScoreSettings(input="/in", output=str(tmp_path), model="m", run_id="r1")
    real = commit_mod.write_manifest

    def fail_the_commit_point(s, r, storage_options=None):
        if s.status == "committed":
            raise OSError("storage went away")
        return real(s, r, storage_options)

    monkeypatch.setattr(commit_mod, "write_manifest", fail_the_commit_point)
    with pytest.raises(OSError):
        commit_mod.commit(summary, run)
    assert summary.status == "committing"
    _record_failure(summary, run, settings, OSError("storage went away"))
    assert read_manifest(str(tmp_path), "r1").status == "committing"
    monkeypatch.setattr(commit_mod, "write_manifest", real)
    assert commit_mod.roll_forward(str(tmp_path)) == ["r1"]
    summary.status = "running"  # as an in-memory summary that missed the commit would be
    _record_failure(summary, run, settings, RuntimeError("after the commit"))
    assert read_manifest(str(tmp_path), "r1").status == "committed"


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
    from tasks.pipeline import IncompleteRunError, check_complete

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
