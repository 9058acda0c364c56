"""Input selection without Ray: manifests, patterns, time window, limit; run records."""
from __future__ import annotations

import os
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from tasks.inputs import is_manifest, list_inputs
from tasks.settings import ScoreSettings


def _uris(**kw):
    return sorted(o.uri.rsplit("/", 1)[-1] for o in list_inputs(ScoreSettings(output="o", **kw)))


def test_include_exclude_are_relative_to_the_input(image_dir):
    assert _uris(input=str(image_dir), include=["photos/*.jpg"]) == ["china.jpg", "flower.jpg", "rocket.jpg"]
    # with a glob input, patterns are relative to the part before the first glob character
    assert _uris(input=str(image_dir / "pho?os" / "*"), include=["photos/c*"]) == \
        ["camera.png", "chelsea.png", "china.jpg", "coffee.png"]
    everything = _uris(input=str(image_dir))
    no_generated = _uris(input=str(image_dir), exclude=["generated/*"])
    assert len(no_generated) == 8 and len(everything) > 8


def test_limit_bounds_the_plan_after_the_skip(image_dir, tmp_path):
    from tasks.enumerate import read_plan
    from tasks.plan import new_run, plan_run

    settings = ScoreSettings(input=str(image_dir), output=str(tmp_path / "o"), limit=3)
    run = new_run(settings)
    counts = plan_run(settings, run, "m", "r")
    assert counts.listed > 3 and counts.to_score == 3 and counts.new == 3 and counts.skipped == 0
    assert read_plan(run.plan_uri).num_rows == 3


def test_time_window(image_dir, tmp_path):
    old = image_dir / "photos" / "china.jpg"
    stamp = datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()
    saved = old.stat().st_mtime
    os.utime(old, (stamp, stamp))
    try:
        recent = _uris(input=str(image_dir / "photos"), modified_after=datetime(2021, 1, 1))
        assert "china.jpg" not in recent and len(recent) == 7
        assert _uris(input=str(image_dir / "photos"), modified_before=datetime(2021, 1, 1)) == ["china.jpg"]
    finally:
        os.utime(old, (saved, saved))


@pytest.mark.parametrize("kind", ["txt", "csv", "parquet"])
def test_manifests(kind, image_dir, tmp_path):
    files = sorted(str(p) for p in (image_dir / "photos").iterdir())
    missing = str(tmp_path / "gone.jpg")
    manifest = tmp_path / f"list.{kind}"
    if kind == "txt":
        manifest.write_text("# photos to score\n" + "\n".join(files + [missing]) + "\n")
    elif kind == "csv":
        pcsv.write_csv(pa.table({"uri": files, "size": [os.path.getsize(f) for f in files]}), manifest)
    else:
        pq.write_table(pa.table({"uri": files + [missing]}), manifest)
    assert is_manifest(str(manifest))
    objs = list(list_inputs(ScoreSettings(input=str(manifest), output="o")))
    uris = [o.uri for o in objs]
    assert all(u.startswith("file:///") for u in uris)  # canonical, like a listing's
    expected = len(files) + (0 if kind == "csv" else 1)
    assert len(objs) == expected
    if kind != "csv":  # looked up: the missing one is kept (it becomes a not_found error row)
        gone = [o for o in objs if o.uri.endswith("gone.jpg")]
        assert gone and gone[0].size is None
    assert all(o.size for o in objs if not o.uri.endswith("gone.jpg"))


def test_manifest_without_uri_column_is_an_error(tmp_path):
    bad = tmp_path / "bad.csv"
    pcsv.write_csv(pa.table({"name": ["a.jpg"]}), bad)
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(list_inputs(ScoreSettings(input=str(bad), output="o")))


def test_latest_view_prefers_the_newest_commit(tmp_path):
    from tasks.history import latest
    from tasks.plan import RunInfo
    from tasks.report import RunSummary, write_manifest
    from tasks.schema import ERRORS_SCHEMA

    out = tmp_path / "out"
    ts = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def run(run_id, committed_at, table, uris):
        path = out / table / "model_slug=m" / "run_date=2026-01-01" / f"part-{run_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        at = "failed_at" if table == "errors" else "scored_at"
        cols = {"uri": uris, "run_id": [run_id] * len(uris), at: [ts] * len(uris)}
        if table == "errors":
            cols.update(error_type=["corrupt_image"] * len(uris), model=["m"] * len(uris))
            pq.write_table(pa.table(cols).select(["uri", "error_type", "model", "run_id", "failed_at"]), path)
        else:
            pq.write_table(pa.table(cols), path)
        summary = RunSummary(run_id, "committed", "m", "in", str(out), files=[f"file://{path}"],
                             committed_at=committed_at)
        write_manifest(summary, RunInfo(run_id, "2026-01-01", "", str(out)))

    run("r1", "2026-01-01T00:00:00", "errors", ["a", "b"])
    run("r2", "2026-01-02T00:00:00", "predictions", ["a", "c"])  # reprocessed a, scored c
    view = {r["uri"]: (r["status"], r["run_id"]) for r in latest(str(out)).to_pylist()}
    assert view == {"a": ("scored", "r2"), "b": ("failed", "r1"), "c": ("scored", "r2")}
    assert ERRORS_SCHEMA.field("failed_at")


def test_a_resume_compares_what_the_run_computes_and_defaults_what_its_manifest_predates():
    from types import SimpleNamespace

    from tasks.plan import resumed_run

    settings = ScoreSettings(input="in", output="o", top_k=3)
    recorded = {k: v for k, v in settings.model_dump().items() if k != "device_decode"}  # an older manifest
    previous = SimpleNamespace(run_id="r1", run_date="2026-11-30", started_at="t", parameters=recorded)
    assert resumed_run(settings, previous).run_id == "r1"
    with pytest.raises(ValueError, match="different device_decode"):
        resumed_run(settings.model_copy(update={"device_decode": True}), previous)
    with pytest.raises(ValueError, match="different top_k"):
        resumed_run(settings.model_copy(update={"top_k": 5}), previous)
