"""The command line and the flow's parameter schema: help, validation, exit codes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from flows.cli import EXIT_OK, EXIT_USAGE, main
from tasks.settings import ScoreSettings


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in ScoreSettings.model_fields:
        assert "--" + name.replace("_", "-") in out
    assert "default: facebook/deit-base-distilled-patch16-224" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--input", "x", "--output", "y", "--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
        (["run", "--input", "x", "--output", "y", "--run-id", "a/b"], "--run-id: use letters"),
        (["run", "--input", "x", "--output", "y", "--modified-after", "2030-01-01", "--modified-before", "2020-01-01"],
         "options: --modified-after (2030-01-01T00:00:00) must be earlier"),
        (["run", "--input", "x", "--output", "y", "--top-k", "five"], "invalid int value"),
        (["run", "--output", "y"], "--input"),
        (["run", "--input", "x", "--output", "y", "--dtype", "int8"], "invalid choice"),
        (["run", "--input", "x", "--output", "y", "--storage-options", "[1]"], "JSON object"),
        (["run", "--input", "x", "--output", "y", "--fast-decode", "--device-decode"], "--fast-decode and --device-"),
        (["run", "--input", "x", "--output", "y", "--only-failed", ""], "--only-failed: must name a run id"),
        (["run", "--input", "x", "--input", "z", "--output", "y"], "--input given twice; give it once"),
        (["run", "--input", "x", "--output", "y", "--device", "cuda", "--gpus-per-actor", "0"], "needs --gpus-per-actor"),
        (["demo", "--num-images", "0"], "at least 1"),
        (["run", "--input", "x", "--output", "/data/scores [v2]"], "must not contain '*', '?' or '['"),
        (["runs", "--output", "nosuchproto://x/"], "Protocol not known"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, expected):
    try:
        code, _, err = _run(capsys, *argv)
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code, err = exit_.code, capsys.readouterr().err
    assert code == EXIT_USAGE
    assert expected in err
    assert len(err.strip().splitlines()) == 1


def test_missing_input_exits_2(capsys, tmp_path, tiny_checkpoint):
    code, _, err = _run(capsys, "run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                        "--model", str(tiny_checkpoint))
    assert code == EXIT_USAGE and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_an_output_that_is_a_file_or_missing_exits_2(capsys, tmp_path, tiny_checkpoint, image_dir):
    a_file = image_dir / "photos" / "china.jpg"
    code, _, err = _run(capsys, "run", "--input", str(image_dir / "photos"), "--output", str(a_file),
                        "--model", str(tiny_checkpoint))
    assert code == EXIT_USAGE and "is a file" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "runs", "--output", str(tmp_path / "never-written"))
    assert code == EXIT_USAGE and "no output at" in err
    (tmp_path / "empty").mkdir()
    assert _run(capsys, "runs", "--output", str(tmp_path / "empty"))[0] == EXIT_OK  # a dataset with no runs yet
    for argv in (["runs", "--output", str(a_file)], ["demo", "--output", str(a_file)]):
        code, _, err = _run(capsys, *argv)
        assert code == EXIT_USAGE and "is a file" in err and len(err.strip().splitlines()) == 1


def test_a_glob_under_a_missing_folder_exits_2(capsys, tmp_path, tiny_checkpoint, image_dir):
    """A renamed prefix must fail the run, not commit no images night after night."""
    code, _, err = _run(capsys, "run", "--input", str(tmp_path / "renamed" / "**" / "*.jpg"), "--output",
                        str(tmp_path / "o"), "--model", str(tiny_checkpoint))
    assert code == EXIT_USAGE and "does not exist" in err and len(err.strip().splitlines()) == 1
    from tasks.enumerate import list_images

    assert len(list(list_images(str(image_dir / "photos" / "*.jpg")))) > 0  # one under a folder that is there


@pytest.mark.parametrize("text", ["{bad", '{"run_id": "r1"}', "[]", ""])
def test_an_unreadable_manifest_is_named_in_one_line(capsys, tmp_path, text):
    """A manifest cut short (a crash of the machine) or foreign: its path and what to do, exit 2."""
    (tmp_path / "_runs" / "r1").mkdir(parents=True)
    (tmp_path / "_runs" / "r1" / "manifest.json").write_text(text)
    for argv in (["runs", "--output", str(tmp_path)], ["runs", "--output", str(tmp_path), "--run-id", "r1"]):
        code, _, err = _run(capsys, *argv)
        assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1
        assert "_runs/r1/manifest.json cannot be read" in err and "move its run folder" in err


def _no_aws_credentials(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # else botocore asks the instance metadata service


@pytest.mark.parametrize("where, uri, expected", [
    ("input", "nosuchproto://bucket/in/", "Protocol not known"),
    ("output", "nosuchproto://bucket/out/", "Protocol not known"),
    ("output", "s3://bucket/out/", "credentials"),
    ("runs", "s3://bucket/out/", "credentials"),
    ("model", "s3://bucket/model/", "AWS_ACCESS_KEY_ID"),
])
def test_unusable_storage_exits_2_with_one_line_before_anything_starts(capsys, tmp_path, monkeypatch,
                                                                       tiny_checkpoint, image_dir, where, uri, expected):
    """An unknown scheme or missing credentials are the driver's own exceptions: still one line, exit 2."""
    _no_aws_credentials(monkeypatch, tmp_path)
    paths = {"input": str(image_dir), "output": str(tmp_path / "o"), "model": str(tiny_checkpoint), where: uri}
    argv = (["runs", "--output", uri] if where == "runs" else
            ["run", "--input", paths["input"], "--output", paths["output"], "--model", paths["model"]])
    code, _, err = _run(capsys, *argv)
    assert code == EXIT_USAGE, err
    assert expected in err and uri in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing ran


def test_unreachable_model_exits_2(capsys, tmp_path, monkeypatch, image_dir):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, _, err = _run(capsys, "run", "--input", str(image_dir), "--output", str(tmp_path / "o"),
                        "--model", "facebook/deit-small-distilled-patch16-224")
    assert code == EXIT_USAGE
    assert "unreachable" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing ran


def test_flow_parameter_schema_carries_bounds():
    from prefect.utilities.callables import parameter_schema

    from flows.score_images import score_images

    props = parameter_schema(score_images.fn).model_dump()["properties"]
    assert set(props) == set(ScoreSettings.model_fields)
    assert props["top_k"]["minimum"] == 1 and props["top_k"]["default"] == 5
    assert props["model"]["default"] == "facebook/deit-base-distilled-patch16-224"
    with pytest.raises(Exception, match="top_k"):
        score_images.validate_parameters({"input": "a", "output": "b", "top_k": 0})
    ok = score_images.validate_parameters({"input": "a", "output": "b", "top_k": "3"})
    assert ok["top_k"] == 3


def test_readme_shows_the_real_help(capsys, monkeypatch):
    """The README's options block is `score-images run --help` verbatim: docs match the code."""
    from pathlib import Path

    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal; the README is 80 wide
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("$ score-images run --help\n") + len("$ score-images run --help\n")
    block = readme[start:readme.index("```", start)]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert block.strip() == capsys.readouterr().out.strip()


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})


def test_bad_input_is_refused_before_anything_heavy_loads(tmp_path, tiny_checkpoint):
    """The cheap checks run first: no torch, transformers, Ray or Prefect for a typo in --input."""
    proc = _python(f"""
        import sys
        from flows.cli import main
        code = main(["run", "--input", {str(tmp_path / 'nope')!r}, "--output", {str(tmp_path / 'o')!r},
                     "--model", {str(tiny_checkpoint)!r}])
        print(code, [m for m in ("torch", "transformers", "ray", "prefect") if m in sys.modules])
    """)
    assert proc.stdout.split() == ["2", "[]"], proc.stderr
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_early_prefect_server_is_the_one_the_flow_uses(tmp_path):
    proc = _python("""
        import threading
        from flows.prefect_early import start_temporary_server
        wait = start_temporary_server()
        assert any(t.name == "prefect-early-start" for t in threading.enumerate())
        wait()
        from prefect.client.orchestration import get_client
        from prefect.server.api.server import SubprocessASGIServer
        server = SubprocessASGIServer()
        assert server.running and server.server_process.poll() is None
        with get_client(sync_client=True) as client:  # what a flow run's engine asks for
            assert str(client.api_url).rstrip("/") == server.api_url, (client.api_url, server.api_url)
            assert client.api_healthcheck() is None
        print("same server")
    """, env={"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "",
              "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert proc.stdout.strip().endswith("same server"), proc.stderr[-2000:]


def test_no_early_server_when_an_api_is_configured(prefect_harness):
    import threading

    from flows.prefect_early import start_temporary_server

    before = threading.active_count()
    start_temporary_server()()
    assert threading.active_count() == before
    assert not any(t.name == "prefect-early-start" for t in threading.enumerate())


def test_unreadable_preprocessing_exits_2_and_leaves_the_cluster(capsys, tmp_path, tiny_checkpoint, image_dir,
                                                                 ray_cluster, prefect_harness):
    """Checked before anything starts (without importing torch): one line, exit 2, nothing written."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "preprocessor_config.json").write_text("{not json")
    code, _, err = _run(capsys, "run", "--input", str(image_dir), "--output", str(tmp_path / "o"),
                        "--model", str(ckpt))
    assert code == EXIT_USAGE and "cannot read preprocessing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert ray_cluster.is_initialized()  # the session's cluster was not ours to stop


def test_ctrl_c_before_the_run_starts_is_one_line_and_exit_130(capsys, monkeypatch):
    import flows.cli as cli

    def interrupted(params):
        raise KeyboardInterrupt  # as Ctrl-C lands while the command checks its arguments or starts Ray

    monkeypatch.setattr(cli, "run_flow", interrupted)
    code, _, err = _run(capsys, "run", "--input", "x", "--output", "y")
    assert code == cli.EXIT_INTERRUPTED == 130 and err.strip() == "score-images: interrupted"


def test_ctrl_c_again_while_shutting_down_keeps_the_resume_line(monkeypatch):
    import flows.cli as cli
    import tasks.ray_cluster

    def pressed_again():
        raise KeyboardInterrupt  # the user's second Ctrl-C, while Ray shuts down

    monkeypatch.setattr(tasks.ray_cluster, "stop_early", pressed_again)
    with pytest.raises(cli.Interrupted, match="^run r1 interrupted; rerun with --run-id r1"):
        cli._stop_early_work("run r1 interrupted; rerun with --run-id r1 (and the same options) to resume")


def test_a_refused_resume_is_one_line_in_the_options_spelling(capsys, tmp_path, tiny_checkpoint, image_dir,
                                                              ray_cluster, prefect_harness):
    """It was Prefect's "Flow run encountered an exception: RunRefused: ... different top_k" (found in review)."""
    from tasks.plan import new_run
    from tasks.report import RunSummary, public_parameters, write_manifest

    out = tmp_path / "o"
    started = ScoreSettings(input=str(image_dir), output=str(out), model=str(tiny_checkpoint), run_id="r1", top_k=3)
    run = new_run(started)
    write_manifest(RunSummary("r1", "failed", started.model, started.input, started.output, run_date=run.run_date,
                              parameters=public_parameters(started), started_at=run.started_at), run)
    code, _, err = _run(capsys, "run", "--input", str(image_dir), "--output", str(out), "--model",
                        str(tiny_checkpoint), "--run-id", "r1", "--top-k", "5")
    (line,) = [line for line in err.splitlines() if line.startswith("score-images:")]
    assert code == 1 and line.startswith("score-images: run r1 failed: run r1 was started with different --top-k;")
    assert "encountered an exception" not in line and "to resume" not in line
