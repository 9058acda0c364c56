"""The production path: a real `prefect server`, deployments from infra/prefect.yaml, a process worker.

Everything goes through the `prefect` command line as an operator would use it;
results are checked through the Prefect client, and the Parquet with DuckDB.
"""
from __future__ import annotations

import re
import shutil
import time
from uuid import UUID

import duckdb
import pytest
import yaml

from tests.prefect_server import REPO, PrefectServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nightly_dirs(session_tmp, photos):
    """The nightly deployment's configured dataset: 4 photos, and its output."""
    root = session_tmp / "nightly"
    (root / "images").mkdir(parents=True)
    for photo in sorted(photos.iterdir())[:4]:
        shutil.copy(photo, root / "images" / photo.name)
    return root / "images", root / "scores"


@pytest.fixture(scope="module")
def server(session_tmp, nightly_dirs, ray_address):
    """Server up, pool created, both deployments deployed, one worker polling.

    The worker's flow runs join the session's Ray cluster through RAY_ADDRESS, as production
    runs join theirs (docs/production.md), rather than each starting a local one.
    """
    srv = PrefectServer(session_tmp / "prefect-server").start()
    try:
        created = srv.cli("work-pool", "create", "score-images", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = srv.cli("deploy", "--prefect-file", "infra/prefect.yaml", "--all", env={
            "SCORE_IMAGES_NIGHTLY_INPUT": str(nightly_dirs[0]),
            "SCORE_IMAGES_NIGHTLY_OUTPUT": str(nightly_dirs[1])})
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        srv.start_worker("score-images", env={"RAY_ADDRESS": ray_address})
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(server.api_url) as c:
        yield c


def _flow_run_id(stdout: str) -> UUID:
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", stdout).group(1))


def test_adhoc_run_on_a_worker(server, client, ray_address, image_dir, tiny_checkpoint, session_tmp):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    out = session_tmp / "adhoc-out"
    result = server.cli("deployment", "run", "score-images/adhoc", "-p", f"input={image_dir}",
                        "-p", f"output={out}", "-p", f"model={tiny_checkpoint}", "-p", "top_k=3",
                        "--watch", "--watch-timeout", "400", timeout=450)
    assert result.returncode == 0, result.stdout + result.stderr + server.log("worker")[-4000:]
    assert "CompletedWithErrors" in result.stdout  # the three broken files

    run = client.read_flow_run(_flow_run_id(result.stdout))
    assert run.state.is_completed() and run.state.name == "CompletedWithErrors"
    assert "3 of 17 images failed" in run.state.message
    assert run.name == "ckpt-tiny-on-images"  # says what ran: model and input folder

    # the data: 14 scored, 3 error rows, read back as users do
    con = duckdb.connect()
    preds = con.execute(f"select count(*), max(len(labels)) from read_parquet('{out}/predictions/**/*.parquet')")
    assert preds.fetchone() == (14, 3)
    kinds = con.execute(f"select error_type, count(*) from read_parquet('{out}/errors/**/*.parquet') "
                    "group by all order by all").fetchall()
    assert sum(n for _, n in kinds) == 3

    # artifacts: a finished progress bar, the summary table and the markdown report
    arts = {a.key: a for a in client.read_artifacts(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))}
    assert float(arts["score-images-progress"].data) == 100.0
    rows = arts["score-images-counts"].data
    rows = yaml.safe_load(rows) if isinstance(rows, str) else rows
    table = {(r["section"], r["item"]): r["value"] for r in rows}
    assert table[("counts", "scored")] == 14 and table[("counts", "failed")] == 3
    assert sum(v for (s, _), v in table.items() if s == "errors") == 3
    assert sum(v for (s, _), v in table.items() if s == "top labels") == 14
    assert {"plan", "score", "commit"} <= {i for (s, i) in table if s == "time (s)"}
    report = arts["score-images-summary"].data
    assert "# Run" in report and "Most frequent labels" in report and "committed" in report

    # our library loggers reach the server with the flow's own logs
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    names = {log.name for log in logs}
    assert any(n.startswith("tasks.") for n in names), names
    assert any("progress:" in log.message for log in logs)
    assert any(f"ray: connected to {ray_address}" in log.message for log in logs)  # the worker's RAY_ADDRESS


def test_bad_parameters_are_refused_by_the_server(server, client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    def runs() -> int:
        return len(client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["adhoc"]))))

    before = runs()
    for bad in (["-p", "top_k=0"], ["-p", "top_k=\"five\""], ["-p", "dtype=int8"], ["-p", "run_id=bad/id"],
                ["-p", "input="]):
        result = server.cli("deployment", "run", "score-images/adhoc", "-p", "input=/data", "-p", "output=/out", *bad)
        assert result.returncode != 0
        text = " ".join((result.stdout + result.stderr).split())
        assert "Validation failed" in text or "validation" in text.lower(), text
    missing = server.cli("deployment", "run", "score-images/adhoc", "-p", "top_k=3")  # no input/output
    assert missing.returncode != 0
    assert runs() == before  # refused before any flow run existed


def test_nightly_schedule_and_one_run_at_a_time(server, client, nightly_dirs, tiny_checkpoint):
    dep = client.read_deployment_by_name("score-images/nightly")
    (schedule,) = dep.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Amsterdam"
    assert dep.parameters["input"] == str(nightly_dirs[0])  # resolved from the environment at deploy time
    assert dep.global_concurrency_limit.limit == 1

    # two nightly runs requested together: the second waits for the first, then
    # finds nothing new (incremental)
    ids = []
    for _ in range(2):
        r = server.cli("deployment", "run", "score-images/nightly", "-p", f"model={tiny_checkpoint}")
        assert r.returncode == 0, r.stdout + r.stderr
        ids.append(_flow_run_id(r.stdout))
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        runs = [client.read_flow_run(i) for i in ids]
        if all(r.state.is_final() for r in runs):
            break
        time.sleep(2)
    assert all(r.state.is_completed() for r in runs), [(r.state.name, r.state.message) for r in runs]
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time >= first.end_time  # never both running
    con = duckdb.connect()
    n = con.execute(f"select count(*) from read_parquet('{nightly_dirs[1]}/predictions/**/*.parquet')").fetchone()[0]
    assert n == 4  # each image once: the second run skipped them all


def test_deployments_match_the_settings_model():
    """Every parameter a deployment sets is a real setting (caught here, not at 2 a.m.)."""
    from tasks.settings import ScoreSettings

    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"nightly", "adhoc"}
    for dep in spec["deployments"]:
        assert set(dep["parameters"]) <= set(ScoreSettings.model_fields), dep["name"]
        assert dep["entrypoint"] == "flows.score_images.score_images"
        assert dep["work_pool"]["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "deit_model,tasks,flows"
