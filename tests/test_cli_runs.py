"""`score-images run` and `score-images demo` end to end: exit codes and what they print."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from flows.cli import EXIT_FAILED, EXIT_OK, main

pytestmark = pytest.mark.slow


def test_run_prints_summary_and_exits_0(ray_cluster, prefect_harness, tiny_checkpoint, image_dir, tmp_path, capsys):
    code = main(["run", "--input", str(image_dir / "photos"), "--output", str(tmp_path / "o"),
                 "--model", str(tiny_checkpoint), "--num-actors", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "committed" in out and "8 listed" in out and "8 scored, 0 failed" in out
    assert f"{tmp_path / 'o'}/predictions" in out and "read_parquet(" in out
    # a batch with no failed image at all: every row is a real prediction
    preds = ds.dataset(tmp_path / "o" / "predictions", partitioning="hive").to_table()
    assert preds.num_rows == 8
    for column in ("label_ids", "labels", "scores", "embedding", "activation"):
        assert preds[column].null_count == 0, column


def test_run_that_fails_exits_1(ray_cluster, prefect_harness, tiny_checkpoint, image_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("output cannot go under a file")
    code = main(["run", "--input", str(image_dir / "photos"), "--output", str(blocker / "out"),
                 "--model", str(tiny_checkpoint), "--num-actors", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5"])
    err = capsys.readouterr().err
    run_id = err.split("score-images: run ")[1].split()[0]  # chosen by the command, named in its last line
    assert code == EXIT_FAILED and f"run {run_id} failed: " in err and f"rerun with --run-id {run_id}" in err


def test_demo_command_offline(session_tmp, tmp_path):
    """The README's first command, offline: falls back to a random checkpoint and says so."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", PREFECT_HOME=str(tmp_path / "ph"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--output", str(tmp_path / "demo"),
                           "--num-images", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in proc.stdout and "labels mean nothing" in proc.stdout
    assert "the dataset holds 4 predictions and 3 errors" in proc.stdout
    assert "in batches of 16 on " in proc.stderr  # --batch-size unset: the size for CPU actors (tasks/placement.py)
    preds = ds.dataset(tmp_path / "demo" / "predictions", partitioning="hive").to_table()
    assert preds.num_rows == 4 and preds.schema.field("embedding").type.list_size == 768
    assert set(preds["model"].to_pylist()) == {"random-facebook--deit-base-distilled-patch16-224"}


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_run_at_once_and_its_id_resumes_it(ray_cluster, prefect_harness, tiny_checkpoint, tmp_path,
                                                            stop):
    """Ctrl-C signals the terminal's whole process group, Prefect's temporary server included.

    SIGTERM (a scheduler, ``kill``) goes to the command alone. It came out of ``ray.wait`` as a
    SystemError, which Prefect took for a crash: exit 1 without the resume line (found in review).
    """
    import io
    import signal
    import time

    from PIL import Image

    from flows.cli import EXIT_INTERRUPTED

    from .test_runs import exactly_once

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(160):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (i, 255 - i, 80)).save(buf, "JPEG")
        (src / f"{i:03d}.jpg").write_bytes(buf.getvalue())
    args = ["run", "--input", str(src), "--output", str(out), "--model", str(tiny_checkpoint), "--batch-size", "2",
            "--rows-per-file", "2", "--num-actors", "1", "--cpus-per-actor", "1", "--decode-cpus", "0"]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "ph"))  # no API: the command starts its own server
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while "progress: " not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        os.kill(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    code = proc.wait(timeout=120)
    stopped_in = time.monotonic() - t0
    last = log.read_text().strip().splitlines()
    message = next(line for line in last if line.startswith("score-images: "))
    assert code == EXIT_INTERRUPTED and stopped_in < 30, (code, stopped_in, last[-5:])
    run_id = message.split("--run-id ")[1].split()[0]
    assert f"run {run_id} interrupted" in message
    assert main([*args, "--run-id", run_id]) == EXIT_OK  # the same options and id resume it
    exactly_once(out, run_id, [f"file://{p}" for p in src.iterdir()])
