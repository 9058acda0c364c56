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
    # at the bounds: modified_after is inclusive, modified_before exclusive; an object without a time is kept
    manifest = tmp_path / "window.csv"
    manifest.write_text("uri,size,last_modified\n"
                        "s3://b/before-after.jpg,1,2021-01-01T23:59:59.999999Z\n"
                        "s3://b/at-after.jpg,1,2021-01-02T00:00:00Z\n"
                        "s3://b/before-before.jpg,1,2021-01-02T23:59:59.999999Z\n"
                        "s3://b/at-before.jpg,1,2021-01-03T00:00:00Z\n"
                        "s3://b/no-time.jpg,1,\n")
    window = dict(input=str(manifest), modified_after=datetime(2021, 1, 2), modified_before=datetime(2021, 1, 3))
    assert _uris(**window) == ["at-after.jpg", "before-before.jpg", "no-time.jpg"]
    assert _uris(**{**window, "modified_before": None}) == ["at-after.jpg", "at-before.jpg", "before-before.jpg",
                                                            "no-time.jpg"]
    assert _uris(**{**window, "modified_after": None}) == ["at-after.jpg", "before-after.jpg", "before-before.jpg",
                                                           "no-time.jpg"]


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


def test_an_image_listed_twice_is_planned_once_as_its_newest_version(image_dir, tmp_path):
    """A manifest naming one image twice (as a path and as a URI), or an inventory of versions."""
    from tasks.enumerate import ImageObject, plan_table, read_plan
    from tasks.plan import new_run, plan_run, unique_uris

    files = sorted(str(p) for p in (image_dir / "photos").iterdir())[:3]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(files + [f"file://{files[0]}", files[1]]) + "\n")
    settings = ScoreSettings(input=str(manifest), output=str(tmp_path / "o"))
    run = new_run(settings)
    counts = plan_run(settings, run, "m", "r")
    plan = read_plan(run.plan_uri)
    assert counts.listed == counts.to_score == plan.num_rows == 3
    assert sorted(plan["uri"].to_pylist()) == sorted(f"file://{f}" for f in files)

    day = lambda d: datetime(2026, 1, d, tzinfo=timezone.utc)  # noqa: E731
    versions = plan_table([ImageObject("s3://b/a.jpg", 1, "v1", day(1)), ImageObject("s3://b/z.jpg", 1, "z", None),
                           ImageObject("s3://b/a.jpg", 3, "v3", day(3)), ImageObject("s3://b/a.jpg", 2, "v2", day(2)),
                           ImageObject("s3://b/z.jpg", 2, "z2", None)])
    kept = unique_uris(versions).to_pylist()
    assert [(r["uri"], r["source_etag"]) for r in kept] == [("s3://b/a.jpg", "v3"), ("s3://b/z.jpg", "z2")]


def test_manifest_without_uri_column_is_an_error(tmp_path):
    bad = tmp_path / "bad.csv"
    pcsv.write_csv(pa.table({"name": ["a.jpg"]}), bad)
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(list_inputs(ScoreSettings(input=str(bad), output="o")))


def test_a_csv_manifests_empty_cells_are_no_values_and_quoted_etags_are_unquoted(tmp_path):
    """An etag of "" (pyarrow reads an empty cell so) made every later version of an object look
    unchanged; a quoted one differed from the listing's for the same object (found in review)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text('uri,size,etag,last_modified\ns3://b/a.jpg,100,,\ns3://b/q.jpg,7,"""abc""",'
                        "2026-01-02T00:00:00Z\n")
    a, q = list(list_inputs(ScoreSettings(input=str(manifest), output="o")))
    assert (a.etag, a.mtime, a.size) == (None, None, 100)
    assert q.etag == "abc" and q.mtime == datetime(2026, 1, 2, tzinfo=timezone.utc)


def test_a_csv_inventory_of_all_versions_is_decoded_and_only_its_current_objects_planned(tmp_path):
    """AWS URL-encodes a CSV inventory's keys; its own header is capitalised; in a report of all
    versions a deleted object's newest row is its delete marker (found in review)."""
    manifest = tmp_path / "inventory.csv"
    manifest.write_text("Bucket,Key,VersionId,IsLatest,IsDeleteMarker,Size\n"
                        "b,photos/sp%20ace+plus%2B.jpg,v2,true,false,10\n"
                        "b,photos/sp%20ace+plus%2B.jpg,v1,false,false,9\n"
                        "b,photos/gone.jpg,v3,true,true,\n"
                        "b,photos/gone.jpg,v2,false,false,5\n"
                        "b,photos/pe%25rc.jpg,v1,true,false,4\n")
    listed = list(list_inputs(ScoreSettings(input=str(manifest), output="o")))
    assert [(o.uri, o.size) for o in listed] == [("s3://b/photos/sp ace plus+.jpg", 10), ("s3://b/photos/pe%rc.jpg", 4)]


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
    previous = SimpleNamespace(run_id="r1", run_date="2026-11-30", started_at="2026-11-30T23:59:58+00:00",
                               parameters=recorded)
    resumed = resumed_run(settings, previous)
    # the run keeps its identity and its first attempt's date and start (its partition and its rows' times)
    assert (resumed.run_id, resumed.run_date, resumed.started_at) == ("r1", "2026-11-30", "2026-11-30T23:59:58+00:00")
    assert resumed.output == "o"
    with pytest.raises(ValueError, match="different device_decode"):
        resumed_run(settings.model_copy(update={"device_decode": True}), previous)
    with pytest.raises(ValueError, match="different top_k"):
        resumed_run(settings.model_copy(update={"top_k": 5}), previous)
    # the same folders named as absolute paths are the same run; another folder is not
    same = settings.model_copy(update={"input": os.path.abspath("in"), "output": os.path.abspath("o") + "/"})
    assert resumed_run(same, previous).run_id == "r1"
    with pytest.raises(ValueError, match="different output"):
        resumed_run(settings.model_copy(update={"output": "s3://b/o"}), previous)


def test_a_commit_killed_between_a_copy_and_its_delete_lists_each_file_once(tmp_path, monkeypatch):
    """On object stores a move is a copy and a delete; dying between them leaves a file in both places."""
    import io
    import secrets

    import fsspec

    from tasks.commit import commit, roll_forward
    from tasks.commit import staged_files
    from tasks.history import committed_files, committed_runs, read_files
    from tasks.plan import RunInfo
    from tasks.report import RunSummary, read_manifest, write_manifest

    fs, out = fsspec.filesystem("memory"), f"memory://b-{secrets.token_hex(4)}/scores"
    run = RunInfo("20260101T000000Z-abcdef", "2026-01-01", "2026-01-01T00:00:00+00:00", out)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": [f"s3://x/{i}.jpg"], "source_size": [1], "source_etag": ["e"],
                                 "source_mtime": pa.array([None], pa.timestamp("us", tz="UTC")),
                                 "model_revision": ["r"]}), buf)
        fs.pipe(f"{out}/_staging/{run.run_id}/predictions/model_slug=m/run_date=2026-01-01/"
                f"part-{run.run_id}-aaaaaa-{i:05d}.parquet", buf.getvalue())
    summary = RunSummary(run.run_id, "running", "m", "in", out, run_date=run.run_date, started_at=run.started_at,
                         files=staged_files(run))  # as the score step counted them
    write_manifest(summary, run)
    real_rm, calls = type(fs).rm, []

    def killed_once(self, path, *args, **kwargs):
        if "_staging" in str(path) and not calls:
            calls.append(path)
            raise KeyboardInterrupt("killed between the copy and the delete")
        return real_rm(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "rm", killed_once)
    with pytest.raises(KeyboardInterrupt):
        commit(summary, run)
    monkeypatch.setattr(type(fs), "rm", real_rm)
    assert read_manifest(out, run.run_id).status == "committing" and calls
    assert roll_forward(out) == [run.run_id]
    manifest = read_manifest(out, run.run_id)
    assert manifest.status == "committed" and len(manifest.files) == len(set(manifest.files)) == 2
    rows = read_files(committed_files(committed_runs(out), "predictions"), ["uri"])
    assert sorted(rows["uri"].to_pylist()) == ["s3://x/0.jpg", "s3://x/1.jpg"]


def test_a_commit_finished_by_two_processes_at_once_stays_committed(tmp_path, monkeypatch):
    """A run starting on this output rolls forward a commit its own process is still making."""
    import json
    import threading

    import tasks.commit as commit_mod
    from tasks.history import committed_runs
    from tasks.plan import RunInfo
    from tasks.report import RunSummary, read_manifest, write_manifest

    out = tmp_path / "out"
    run = RunInfo("run-a", "2026-01-01", "2026-01-01T00:00:00+00:00", str(out))
    staged = out / "_staging/run-a/predictions/model_slug=m/run_date=2026-01-01"
    staged.mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.table({"uri": [f"file:///img{i}.jpg"]}), staged / f"part-run-a-abcdef-{i:05d}.parquet")
    summary = RunSummary("run-a", "committing", "m", "in", str(out), run_date=run.run_date, started_at=run.started_at,
                         files=[commit_mod.final_uri(run, f) for f in commit_mod.staged_files(run)])
    write_manifest(summary, run)  # run A has written its intent and is moving its files...
    real_staged, listed, a_done, errors = commit_mod.staged_files, threading.Event(), threading.Event(), []

    def staged_then_wait(r, so=None):  # ...while run B lists them and waits for A to finish
        files = real_staged(r, so)
        if threading.current_thread().name == "B":
            listed.set()
            a_done.wait(30)
        return files

    def run_b():
        try:
            commit_mod.roll_forward(str(out))
        except Exception as exc:  # noqa: BLE001 - the assertion says what B raised
            errors.append(exc)

    monkeypatch.setattr(commit_mod, "staged_files", staged_then_wait)
    b = threading.Thread(target=run_b, name="B")
    b.start()
    assert listed.wait(30)
    commit_mod.commit(RunSummary(**json.loads((out / "_runs/run-a/manifest.json").read_text())), run)
    a_done.set()
    b.join(30)
    assert errors == [] and read_manifest(str(out), "run-a").status == "committed"
    assert [r.run_id for r in committed_runs(str(out))] == ["run-a"]
    assert len(list(out.glob("predictions/**/*.parquet"))) == 3 and not (out / "_staging/run-a").exists()


def test_lasting_failures_are_history_and_retries_go_last(image_dir, tmp_path):
    """A corrupt image is not retried every night; images that may pass are, after the rest."""
    from tasks.enumerate import plan_table, read_plan
    from tasks.plan import RunInfo, new_run, plan_run
    from tasks.report import RunSummary, write_manifest

    out = tmp_path / "o"
    settings = ScoreSettings(input=str(image_dir / "photos"), output=str(out))
    listing = plan_table(sorted(list_inputs(settings), key=lambda o: o.uri))
    uris = listing["uri"].to_pylist()
    # an earlier committed run: uris[0] failed for good, uris[1:3] with errors that may pass
    failed = listing.slice(0, 3).append_column("error_type", pa.array(["corrupt_image", "read_error", "process_died"]))
    failed = failed.append_column("model_revision", pa.array(["r"] * 3)).append_column(
        "run_id", pa.array(["earlier"] * 3)).append_column("failed_at", listing["source_mtime"].slice(0, 3))
    part = out / "errors/model_slug=m/run_date=2026-01-01/part-earlier-aaaaaa-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(failed, part)
    earlier = RunInfo("earlier", "2026-01-01", "2026-01-01T00:00:00+00:00", str(out))
    write_manifest(RunSummary("earlier", "committed", "m", "in", str(out), run_date=earlier.run_date,
                              started_at=earlier.started_at, committed_at=earlier.started_at,
                              files=[str(part)]), earlier)

    def plan(**kw):
        s = settings.model_copy(update=kw)
        run = new_run(s)
        return plan_run(s, run, "m", "r"), read_plan(run.plan_uri)["uri"].to_pylist()

    counts, planned = plan()
    assert counts.failed_before == 1 and counts.to_score == len(uris) - 1 and uris[0] not in planned
    counts, planned = plan(limit=len(uris) - 3)  # room for the never-tried only: no retry in it
    assert sorted(planned) == uris[3:]
    counts, planned = plan(limit=len(uris) - 2)
    assert planned[:-1] == sorted(planned[:-1]) and planned[-1] in uris[1:3] and uris[0] not in planned
    assert plan(only_failed="any")[1] == uris[:3]  # --only-failed retries lasting failures too
    assert sorted(plan(force=True)[1]) == uris
    other_revision = plan_run(settings, new_run(settings), "m", "r2")  # another revision may decode it
    assert other_revision.failed_before == 0 and other_revision.to_score == len(uris)


def test_a_manifest_from_a_newer_version_is_read(tmp_path, caplog):
    """Fields this version does not know (a newer count, say) are left out, not a TypeError."""
    import json

    from tasks.commit import roll_forward
    from tasks.plan import RunInfo
    from tasks.report import format_summary, list_runs, read_manifest, write_manifest

    (tmp_path / "_runs" / "r1").mkdir(parents=True)
    record = {"run_id": "r1", "status": "committed", "model": "m", "input": "in", "output": str(tmp_path),
              "listed": 3, "future_count": 7}
    (tmp_path / "_runs" / "r1" / "manifest.json").write_text(json.dumps(record))
    assert [r.listed for r in list_runs(str(tmp_path))] == [3] and roll_forward(str(tmp_path)) == []
    assert "future_count" in caplog.text
    summary = read_manifest(str(tmp_path), "r1")
    summary.attempts += 1  # rewritten by this version (a resume, a roll-forward): the newer field stays
    write_manifest(summary, RunInfo("r1", "", "", str(tmp_path)))
    assert json.loads((tmp_path / "_runs" / "r1" / "manifest.json").read_text())["future_count"] == 7
    # no predictions written: the summary offers no query that would fail on a missing folder
    assert "read_parquet" not in format_summary(summary) and "0 files" in format_summary(summary)


@pytest.mark.parametrize("fraction, cap, planned, limit", [
    (0.05, None, 9, 1),     # a small nightly run tolerates its one broken file (rounded down, 0)
    (0.05, None, 19, 1),
    (0.05, None, 100, 5),
    (0.2, None, 11, 2),
    (0.0, None, 100, 0),    # a share of 0 tolerates none
    (0.05, 0, 100, 0),      # the smaller of the two
    (None, 3, 100, 3),
    (None, None, 100, None),
])
def test_the_failure_limit_rounds_a_share_down_but_tolerates_one(fraction, cap, planned, limit):
    from tasks.pipeline import ErrorThresholdExceeded, check_failures, failure_limit

    settings = ScoreSettings(input="i", output="o", max_failed=cap, max_failed_fraction=fraction)
    assert failure_limit(settings, planned) == limit
    if limit is not None:
        check_failures(settings, planned, limit, {"empty_object": limit})  # at the limit: passes
        with pytest.raises(ErrorThresholdExceeded, match="rerun it with the same --run-id and a higher"):
            check_failures(settings, planned, limit + 1, {"empty_object": limit + 1})


@pytest.mark.parametrize("parameters, says", [
    ({}, "8 already scored"),
    ({"only_failed": "any"}, "8 not selected (--only-failed)"),
    ({"force": True, "limit": 1}, "8 left for a later run (--limit)"),
])
def test_the_summary_names_what_the_plan_left_out(parameters, says):
    """With --only-failed, never-scored images were reported as "already scored" (found in review)."""
    from tasks.report import RunSummary, format_summary

    summary = RunSummary(run_id="r", status="committed", model="m", input="i", output="o", listed=9,
                         changed=1, skipped=8, to_score=1, parameters=parameters)
    assert "9 listed: 0 new, 1 changed, " + says in format_summary(summary)


@pytest.mark.parametrize("name, body, reason", [
    ("m.txt", b"caf\xe9.jpg\n", "'utf-8' codec can't decode byte 0xe9"),
    ("m.parquet", b"not parquet at all", "Parquet magic bytes not found"),
])
def test_a_manifest_that_cannot_be_parsed_refuses_the_run_naming_it(tmp_path, name, body, reason):
    """It was exit 1 with "rerun ... to resume", which reads the same bytes again (found in review)."""
    from tasks.plan import RunRefused

    (tmp_path / name).write_bytes(body)
    settings = ScoreSettings(input=str(tmp_path / name), output=str(tmp_path / "o"))
    with pytest.raises(RunRefused, match=f"manifest .*{name} cannot be read \\({reason}"):
        list(list_inputs(settings))
