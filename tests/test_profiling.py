"""The device profile a scoring actor takes when DEIT_PROFILE_DIR is set, and what reads it back.

On this CPU-only machine the profiler has no device to record, so the actor's
trace holds no kernels; the summary's arithmetic is checked on a trace written
in kineto's format with two streams' kernels that overlap.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import device_profile  # noqa: E402


def test_busy_seconds_counts_overlapping_work_once():
    assert device_profile.busy_seconds([]) == 0.0
    spans = [(3.0, 4.0), (0.0, 1.0), (0.5, 2.0), (3.2, 3.5), (1.0, 1.5)]
    assert device_profile.busy_seconds(spans) == pytest.approx(3.0)


def _kineto_trace(tmp_path: Path) -> Path:
    """A note and its trace: 1 s window, two streams' kernels overlapping, a copy, runtime calls, host ops."""
    def ev(cat, name, ts_ms, dur_ms, **kw):
        return {"ph": "X", "cat": cat, "name": name, "ts": 1_000_000 + ts_ms * 1000, "dur": dur_ms * 1000, **kw}

    events = [ev("kernel", "gemm", 0, 300, stream=7), ev("kernel", "gemm", 400, 100, stream=7),
              ev("kernel", "resize_aa", 250, 100, stream=13),  # overlaps the first gemm by 50 ms
              ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 600, 50),
              ev("cuda_runtime", "cudaStreamSynchronize", 0, 200), ev("cuda_runtime", "cudaLaunchKernel", 0, 1),
              ev("cpu_op", "aten::mm", 0, 900),  # host work: not the device's
              {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0}]
    (tmp_path / "device-profile-1.trace.json").write_text(json.dumps({"traceEvents": events}))
    note = {"wall_s": 1.0, "images": 512, "device": "cuda", "trace": "device-profile-1.trace.json",
            "started_after_first_call_s": 4.0}
    (tmp_path / "device-profile-1.json").write_text(json.dumps(note))
    return tmp_path / "device-profile-1.json"


def test_summary_of_a_trace_counts_the_device_busy_once_and_ranks_its_work(tmp_path, capsys):
    note = _kineto_trace(tmp_path)
    s = device_profile.summarize(note)
    # gemm 0-300 and 400-500, resize 250-350, copy 600-650: busy 0-350, 400-500, 600-650 = 0.5 s of 1 s
    assert s["device_busy_fraction"] == pytest.approx(0.5) and s["device_seconds"] == pytest.approx(0.55)
    assert s["img_per_s"] == 512
    assert [(k["name"], k["count"]) for k in s["kernels"]] == [("gemm", 2), ("resize_aa", 1)]
    assert s["kernels"][0]["seconds"] == pytest.approx(0.4)
    assert [c["name"] for c in s["copies"]] == ["Memcpy HtoD (Pinned -> Device)"]
    assert s["runtime"][0] == {"name": "cudaStreamSynchronize", "count": 1, "seconds": 0.2}
    assert device_profile.main([str(tmp_path), "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "device busy 50.0 %" in out and "cudaStreamSynchronize" in out
    assert list(json.loads((tmp_path / "s.json").read_text()).values())[0]["device_busy_fraction"] == 0.5


def test_summary_command_says_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        device_profile.main([str(tmp_path)])
    assert exc.value.code == 2 and "was DEIT_PROFILE_DIR set" in capsys.readouterr().err


def test_profiler_is_off_unless_asked_and_survives_a_bad_window(monkeypatch, caplog):
    from deit_model import profiling

    monkeypatch.delenv(profiling.ENV_DIR, raising=False)
    assert profiling.profiler_from_env() is None
    monkeypatch.setenv(profiling.ENV_DIR, "/tmp/x")
    monkeypatch.setenv(profiling.ENV_WINDOW, "soon")
    prof = profiling.profiler_from_env()
    assert (prof.delay, prof.seconds) == (3.0, 2.0) and "is not 'delay,seconds'" in caplog.text
    monkeypatch.setenv(profiling.ENV_WINDOW, "0.5,1.5")
    assert (profiling.profiler_from_env().delay, profiling.profiler_from_env().seconds) == (0.5, 1.5)


def test_scoring_actor_records_a_window_while_it_scores(tiny_checkpoint, photos, tmp_path, monkeypatch):
    """With DEIT_PROFILE_DIR the actor writes a trace and the images it scored in the window."""
    from deit_model import load_preprocessor
    from tasks.decode import decode_batch
    from tasks.schema import OutputSpec
    from tasks.score import BatchContext, ScoringActor

    monkeypatch.setenv("DEIT_PROFILE_DIR", str(tmp_path / "prof"))
    monkeypatch.setenv("DEIT_PROFILE_WINDOW", "0.2,0.6")
    actor = ScoringActor(model=str(tiny_checkpoint), revision=None, device="cpu", dtype="fp32", top_k=3,
                         storage_options={})
    uris = [f"file://{p}" for p in sorted(photos.glob("*"))[:2]]
    plan = {"uri": np.array(uris, object), "source_size": np.zeros(2), "source_etag": np.array([None] * 2, object),
            "source_mtime": np.array(["2026-01-01"] * 2, dtype="datetime64[us]")}
    batch = decode_batch(plan, preprocessor=load_preprocessor(str(tiny_checkpoint)), max_pixels=10**8,
                         fast_decode=False, storage_options={})
    deadline = time.monotonic() + 60
    while actor._profiler._thread is None or actor._profiler._thread.is_alive():
        assert actor.score_batch(dict(batch), BatchContext("r", "m", OutputSpec(64))).num_rows == 2
        assert time.monotonic() < deadline, "the profile window never closed"
    notes = device_profile.notes([str(tmp_path / "prof")])
    assert len(notes) == 1
    s = device_profile.summarize(notes[0])
    assert s["device"] == "cpu" and 0.6 <= s["wall_s"] < 5 and s["images"] > 0 and s["images"] % 2 == 0
    assert s["kernels"] == [] and s["device_busy_fraction"] == 0.0  # no device here: nothing ran on one
