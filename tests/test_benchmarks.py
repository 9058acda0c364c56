"""The throughput benchmark's own parts: image sizes, the memory sampler, the timing rules.

The benchmark itself (benchmarks/throughput.py) is not part of the suite; these
check the pieces its figures rest on, in a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import actor_loop  # noqa: E402
import decode_stage  # noqa: E402
import driver_stage  # noqa: E402
import gpu_check  # noqa: E402
import harness  # noqa: E402
import images  # noqa: E402
import options  # noqa: E402
import procmem  # noqa: E402
import read_ahead  # noqa: E402
import s3_read  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402


def test_small_images_are_imagenet_sized():
    sizes = [len(images.render(images.KINDS["small"], seed)) for seed in range(6)]
    assert all(95_000 <= s <= 125_000 for s in sizes), sizes
    assert len(set(sizes)) == len(sizes)  # distinct renders


def test_phone_photo_is_12_megapixels_and_about_3_mb():
    from PIL import Image
    import io

    data = images.render(images.KINDS["phone"], 0)
    assert 2_500_000 <= len(data) <= 3_500_000
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (4000, 3000) and img.format == "JPEG"


def test_image_set_is_distinct_files_and_reused(tmp_path):
    made = images.make_images(tmp_path / "set", 5, "small", pool=2, workers=1)
    paths = [Path(p) for p in images.list_images(tmp_path / "set", 5)]
    assert all(p.is_file() for p in paths) and made["n"] == 5 and made["pool"] == 2
    assert len({p.stat().st_ino for p in paths}) == 5  # copies, not links
    assert paths[0].read_bytes() == paths[2].read_bytes() != paths[1].read_bytes()
    before = paths[4].stat().st_mtime_ns
    assert images.make_images(tmp_path / "set", 5, "small", pool=2, workers=1) == made
    assert paths[4].stat().st_mtime_ns == before  # reused, not rewritten


def test_peak_memory_sums_the_process_tree(tmp_path):
    # the parent holds 150 MiB and its child another 100 MiB while both sleep
    child = "b = bytearray(100 * 2**20); import time; time.sleep(3)"
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "a = bytearray(150 * 2**20); time.sleep(3); p.wait(); print('BENCH {\"event\": \"done\", \"n\": 2}')")
    run = procmem.run_measured([sys.executable, "-c", parent], env={}, patterns={"done": r"\"n\": (\d+)"})
    assert run.returncode == 0
    assert run.memory.rss_bytes >= 250 * 2**20 and run.memory.processes >= 2
    assert run.memory.pss_bytes >= 200 * 2**20
    assert [e["event"] for e in run.events] == ["done"] and run.first("done")[1] == ("2",)
    assert run.launched < run.events[0]["received"] <= run.ended


def test_sampler_reads_pss_and_scans_proc_on_their_own_clocks(monkeypatch):
    # the costly reads (smaps_rollup, all of /proc) run on slower clocks than the RSS samples,
    # since the sampler's CPU is taken from the stage it measures
    calls = {"pss": 0, "scan": 0}
    real_pss, real_scan = procmem.pss_bytes, procmem.descendants

    def pss(pid):
        calls["pss"] += 1
        return real_pss(pid)

    def scan(root):
        calls["scan"] += 1
        return real_scan(root)

    monkeypatch.setattr(procmem, "pss_bytes", pss)
    monkeypatch.setattr(procmem, "descendants", scan)
    # a child of its own: this process's tree holds the session's Ray and Prefect processes
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)  # past its start-up, so its RSS holds steady
        with procmem.PeakMemory(child.pid, interval=0.02, pss_seconds=5.0, scan_seconds=0.5) as mem:
            time.sleep(1.2)
    finally:
        child.kill()
        child.wait()
    peak = mem.peak
    assert peak.samples >= 20  # RSS every interval
    assert calls["scan"] <= 5  # at 0, 0.5, 1.0 s and the last sample
    assert calls["pss"] <= 3  # at the start and the last sample (its RSS holds steady)
    assert peak.pss_bytes > 0 and peak.rss_bytes >= peak.pss_bytes
    assert 0 < peak.sampler_cores < 1


def test_cpu_time_of_the_tree_is_counted_as_its_own():
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    run = procmem.run_measured([sys.executable, "-c", spin], env={})
    assert 1.2 <= run.memory.tree_cpu_s <= 3.0  # its own, not "other work" (which a shared machine varies)


def test_run_measured_kills_its_group_on_timeout():
    start = time.monotonic()
    run = procmem.run_measured([sys.executable, "-c", "import time; time.sleep(60)"], env={}, timeout=1)
    assert run.returncode != 0 and time.monotonic() - start < 20


def _run(launched: float) -> procmem.ChildRun:
    return procmem.ChildRun(0, launched, launched + 100, {}, [], [], procmem.MemoryPeak())


def test_steady_state_skips_the_settling_window_and_start_up():
    # first result (64 images) at t=30, a queue of results right behind it, then 10 img/s
    points = [(30.0, 64), (31.0, 128), (45.0, 264), (55.0, 364), (60.0, 414)]
    row = throughput.stage_row("ours", 414, 414, _run(0.0), points, settle=10)
    assert row["startup_s"] == 30.0
    assert row["rate"] == pytest.approx(10.0)  # from t=45 to t=60, not from the first result
    short = throughput.stage_row("ours", 128, 128, _run(0.0), points[:2], settle=10)
    assert short["rate"] == pytest.approx(64.0)  # too short to settle: from the first result


def test_a_run_missing_rows_reports_no_figure():
    with pytest.raises(RuntimeError, match="wrote 99 rows for 100 images"):
        throughput.stage_row("peer", 100, 99, _run(0.0), [(1.0, 32), (2.0, 100)], settle=10)


def test_report_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Title\n\nmethod\n\n{report.BEGIN}\nplaceholder\n{report.END}\n\nafter\n")
    report.write_out(doc, "new table\n", {})
    assert doc.read_text() == f"# Title\n\nmethod\n\n{report.BEGIN}\nnew table\n{report.END}\n\nafter\n"


def test_report_table_and_ratios():
    cfg = SimpleNamespace(cpus_per_actor=1.0, batch_size=32, device="cpu", kind="small", source="local",
                          num_actors=1, decode_cpus=1.0, fast_decode=False, peer_cpus_per_actor=1.0,
                          peer_decode_cpus=1.0)
    mem = procmem.MemoryPeak(rss_bytes=2**30, pss_bytes=2**29).as_dict()
    block = {"model": "m", "dtype": "fp32",
             "ceiling": [{"stage": "ceiling (1 thread)", "threads": 1, "batch": 32, "rate": 21.0, "memory": mem,
                          "busy_before": 0.0},
                         {"stage": "ceiling (2 threads)", "threads": 2, "batch": 32, "rate": 40.0, "memory": mem,
                          "busy_before": 0.0},
                         {"stage": "ceiling (2 threads)", "threads": 2, "batch": 64, "rate": 45.0, "memory": mem,
                          "busy_before": 0.0},
                         {"stage": "ceiling (2 threads), after", "threads": 2, "batch": 32, "rate": 30.0,
                          "memory": mem, "busy_before": 0.0, "after": True}],
             "runs": {1000: [
                 {"stage": "ours", "images": 1000, "rate": 36.0, "startup_s": 12.0, "wall_s": 50.0, "memory": mem,
                  "startup_marks": {"ray_connected": 5.0}, "busy_before": 0.0},
                 {"stage": "baseline", "images": 1000, "rate": 12.0, "startup_s": 5.0, "wall_s": 90.0,
                  "memory": mem, "busy_before": 0.0},
                 {"stage": "peer", "error": "boom"}]}}
    text = "\n".join(report.format_block(cfg, block))
    # against the machine's best forward rate (2 threads, batch 64), with the rate at ours' batch beside it
    assert ("ours / ceiling = 0.80 (target >= 0.85; the best ceiling, 45.0 img/s at batch 64, 2 threads; "
            "at ours' batch 32: 0.90)") in text
    # the drift check compares like with like: batch 32 after ours against batch 32 before
    assert "ceiling at batch 32 right after ours' first run / before = 0.75; ours / the mean of both = 1.03" in text
    assert "ours / baseline = 3.00" in text and "ours / peer = –" in text
    assert "| ours | 1,000 | 32 | 36.0 | 12.0 | 50.0 | 1,024 | 512 | 1.00 |" in text
    assert "| peer | 1,000 | | failed: boom |" in text
    assert "too short for the settling window" not in text
    block["runs"][1000][1]["settled"] = False  # the baseline's window could not settle: marked, with a footnote
    text = "\n".join(report.format_block(cfg, block))
    assert "| baseline | 1,000 | 32 | 12.0* |" in text and "\\* too short for the settling window" in text


def test_a_report_written_again_replaces_itself(tmp_path):
    """Saved after every stage: a file without markers gets them, so the next save replaces the first."""
    doc = tmp_path / "out.md"
    doc.write_text("# notes\n")
    report.write_out(doc, "first\n", {})
    report.write_out(doc, "second\n", {})
    assert doc.read_text() == f"# notes\n\n{report.BEGIN}\nsecond\n{report.END}\n"


def test_every_stage_saves_and_an_interrupted_one_says_so(monkeypatch):
    saved = []
    cfg = SimpleNamespace(wait_idle=0, save=lambda: saved.append(list(rows)))
    rows: list = []
    monkeypatch.setattr(procmem, "busy_cores", lambda *a: 0.0)
    throughput.run_stage(rows, "ours", lambda c: {"stage": "ours", "rate": 5.0}, cfg)
    throughput.run_stage(rows, "peer", lambda c: 1 / 0, cfg)  # a failure is a row, the run goes on
    assert saved[-1] == [{"stage": "ours", "rate": 5.0, "busy_before": 0.0},
                         {"stage": "peer", "error": "division by zero", "busy_before": 0.0}]

    def cut_off(c):
        raise SystemExit(143)  # device_run.sh's timeout, through main's SIGTERM handler

    with pytest.raises(SystemExit):
        throughput.run_stage(rows, "cait", cut_off, cfg)
    assert len(saved) == 3 and saved[-1][-1] == {"stage": "cait", "error": "interrupted (time limit)",
                                                 "busy_before": 0.0}


def test_commit_is_the_recorded_one_where_set(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    assert harness.git_commit().split()[0] != "unknown"  # this checkout is a git repository
    # device_run.sh's: wins over a .git, which on the device named the commit before the one run
    monkeypatch.setenv("BENCH_COMMIT", "abc123 (recorded by device_bundle.sh)")
    assert harness.git_commit() == "abc123 (recorded by device_bundle.sh)"
    monkeypatch.setattr(harness, "ROOT", tmp_path)  # and a copy of the tree without .git
    assert harness.git_commit() == "abc123 (recorded by device_bundle.sh)"
    monkeypatch.delenv("BENCH_COMMIT")
    assert harness.git_commit() == "unknown"


@pytest.mark.parametrize("device, decode, ours, peer", [
    ("cpu", None, (2, 1.0, 0.0), (2, 0.75, 0.5)),  # ours decodes in its actors, the recipe keeps its tasks
    ("cpu", 0.5, (2, 0.75, 0.5), (2, 0.75, 0.5)),
    ("cuda", None, (1, 1.0, 1.0), (1, 1.0, 1.0)),
])
def test_default_layouts_on_two_cores(device, decode, ours, peer):
    cfg = SimpleNamespace(device=device, num_actors=None, cpus_per_actor=None, decode_cpus=decode)
    options.default_layout(cfg, 2)
    assert (cfg.num_actors, cfg.cpus_per_actor, cfg.decode_cpus) == ours
    assert (cfg.num_actors, cfg.peer_cpus_per_actor, cfg.peer_decode_cpus) == peer
    if device == "cpu":  # never more reserved than the cores: Ray would queue forever
        assert cfg.num_actors * cfg.cpus_per_actor + cfg.decode_cpus <= 2
        assert cfg.num_actors * cfg.peer_cpus_per_actor + cfg.peer_decode_cpus <= 2


def test_baseline_and_peer_run_only_at_the_compared_sizes(monkeypatch):
    cfg = throughput.parse_args(["--images", "10000", "100000", "--baseline-images", "4000"])
    assert cfg.compare_at == [10000]
    ran = []
    monkeypatch.setattr(throughput, "run_stage", lambda rows, stage, fn, cfg, *a: ran.append((stage, a[-1])))
    for i, n in enumerate(cfg.images):
        throughput._end_to_end(cfg, [], None, "fp32", None, n, "src", {}, "",
                               (lambda: ran.append(("ceiling, after", None))) if i == 0 else None)
    # the slow baseline on the first 4,000 images of the set; the others on all of it; the ceiling's
    # repeat right after ours' first run, so that the two ceilings bracket it
    assert [(stage, n if stage == "baseline" else None) for stage, n in ran] == [
        ("ours", None), ("ceiling, after", None), ("baseline", 4000), ("peer", None), ("ours", None)]


def test_decode_stage_measures_both_pixel_types(tiny_checkpoint, photos):
    """The decode-stage figures of docs/scale.md: the same images as float32 and as a quarter of the bytes."""
    uris = sorted(str(p) for p in photos.iterdir())
    out = decode_stage.measure_decode(uris, str(tiny_checkpoint), batch_size=2, rounds=1)
    assert out["images"] == len(uris) and out["splits_exactly"] is True and out["plain_jpegs_by_torchvision"] is True
    from deit_model import hf_steps, load_preprocessor

    # transformers 5.24+, whose call copies each image contiguous: its steps on channels-last batches
    assert out["steps_on_channels_last_batches"] is (load_preprocessor(str(tiny_checkpoint))._convert is hf_steps.planar_tensors)
    for alt in ("pil", "library"):
        assert out[f"float32_{alt}"]["bytes_per_image"] == out["float32"]["bytes_per_image"]
        assert out[f"uint8_{alt}"]["bytes_per_image"] == out["uint8"]["bytes_per_image"]
    assert out["float32"]["bytes_per_image"] == 3 * 224 * 224 * 4 == 4 * out["uint8"]["bytes_per_image"]
    assert out["float32"]["ms_per_image"] > 0 and out["uint8"]["ms_per_image"] > 0 and out["finish_ms_per_image"] > 0
    # --device-decode: the JPEGs' own bytes go on, the PNGs as uint8 pixels
    jpegs = [p for p in photos.iterdir() if p.suffix == ".jpg"]
    offsets = len(uris) // 2 * (3 + 2) * 8  # batches of 2: 3 int64 offsets and 2 pixel counts each
    sent = sum(p.stat().st_size for p in jpegs) + (len(uris) - len(jpegs)) * out["uint8"]["bytes_per_image"] + offsets
    assert out["device_jpeg"]["bytes_per_image"] == sent // len(uris) and out["device_finish_ms_per_image"] > 0


def test_actor_loop_takes_a_decoding_actors_time_apart(tiny_checkpoint, photos):
    """benchmarks/actor_loop.py: the forward pass alone and after a decode, and the decode, in a real process."""
    uris = sorted(str(p) for p in photos.iterdir())
    out = actor_loop.measure(uris, str(tiny_checkpoint), processes=1, batch_size=2, rounds=1, batches=3)
    part = out["per_process"][0]
    names = {"forward", "decode", "score_after_decode"}
    assert set(part) == names | {f"{n}_mean" for n in names} and all(v > 0 for v in part.values())
    assert out["cap"] == pytest.approx(part["forward"] / (part["score_after_decode"] + part["decode"]))
    assert 0 < out["cap"] < 1  # decoding a photo takes time that the forward pass alone does not


def test_s3_source_holds_each_request_for_its_latency_after_the_upload(tmp_path):
    """--s3-latency-ms: the S3 server answers each request that much later, once the set is uploaded."""
    import s3fs

    root = tmp_path / "small-3"
    images.make_images(root, 3, "small", workers=1)
    with images.S3Source(root, 3, latency_ms=1000) as s3:
        fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, use_listings_cache=False)
        start = time.perf_counter()
        paths = fs.find(s3.uri)
        held = time.perf_counter() - start
        s3._server.latency_s = 0
        start = time.perf_counter()
        data = fs.cat(paths)
        quick = time.perf_counter() - start
    assert len(paths) == 3 and all(len(v) > 50_000 for v in data.values())
    assert held >= 1.0 > quick
    with pytest.raises(SystemExit):  # a wait for local files is a mistake, said as such
        options.parse_args(["--s3-latency-ms", "20"], "d")


def test_read_ahead_runs_two_calls_at_once_with_a_third_waiting():
    """benchmarks/read_ahead.py's read-ahead mode runs calls as Ray runs a CPU actor's: two at once."""
    import threading

    lock, running, most, seen = threading.Lock(), [0], [0], []

    class Actor:
        def score_batch(self, batch, context):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
                seen.append(batch)

    read_ahead._two_threads(Actor(), list(range(7)), None)
    assert sorted(seen) == list(range(7)) and most[0] == 2


def test_s3_read_measures_the_reader_each_mode_names(tmp_path, capsys):
    """benchmarks/s3_read.py: obstore and s3fs alone, each checked to be the one reading, on the server."""
    root = tmp_path / "small-8"
    images.make_images(root, 8, "small", pool=2, workers=1)
    cores = os.sched_getaffinity(0)
    s3_read.main(["--images", str(root), "--latency-ms", "0", "--batch-size", "4", "--batches", "1",
                  "--rounds", "1"])
    assert os.sched_getaffinity(0) == cores  # the test process gets its cores back
    out = json.loads(capsys.readouterr().out)
    for mode in s3_read.MODES:
        figures = out["latency_ms"]["0"][mode]
        assert figures["median_cpu_ms"] > 0 and figures["median_wall_ms"] > 0


def test_ours_runs_as_a_module_where_the_command_is_not_installed(tmp_path, monkeypatch):
    import subprocess

    assert harness.ours_command() == [str(Path(sys.executable).parent / "score-images")]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))  # no score-images beside it
    assert harness.ours_command() == [str(tmp_path / "python3"), "-m", "flows.cli"]
    monkeypatch.undo()
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and "--decode-cpus" in run.stdout


def test_gpu_check_compares_a_device_with_the_cpu(tiny_checkpoint):
    """The GPU session's first step, with the CPU as the device: everything equal, and a decode rate."""
    jpegs = [images.render(images.KINDS["small"], seed) for seed in range(2)]
    out = gpu_check.check_model(str(tiny_checkpoint), jpegs, "cpu")
    assert out["splits_exactly"] and out["pixels_equal"] and out["fp32"]["max_score_diff"] == 0
    assert out["bf16"]["top1_agree"] >= 0.5 and out["bf16"]["min_embedding_cosine"] > 0.999
    dev = out["device_decode"]
    assert dev["refused"] == 0 and dev["max_level_diff"] == 0 and dev["top1_agree"] == 1 and dev["img_per_s"] > 0
    assert dev["two_threads"]["label_agree"] == 1 and dev["two_threads"]["max_score_diff"] < 1e-6
    assert dev["broken"] == {"refused": [1], "expected": [1], "others_equal": True}  # among the good ones
    lap = dev["overlap"]  # each alone, then both at once: rates, and the bound of one against the other
    assert min(lap["decode_alone"], lap["forward_alone"], lap["decode_together"], lap["forward_together"]) > 0
    assert lap["serial"] < min(lap["decode_alone"], lap["forward_alone"])
    assert lap["together"] == min(lap["decode_together"], lap["forward_together"])


def test_gpu_check_keeps_the_exact_checks_of_every_model_before_device_decode(tiny_checkpoint, tmp_path,
                                                                            monkeypatch):
    """A time limit that cuts the run short keeps what matters most: each model's exact pixels first."""
    order = []
    monkeypatch.setattr(gpu_check, "_checkpoint", lambda name, root: tiny_checkpoint)
    monkeypatch.setattr(gpu_check, "check_exact", lambda c, j, d: order.append("exact") or {"pixels_equal": True})
    monkeypatch.setattr(gpu_check, "check_device_decode", lambda c, j, d: order.append("dd") or {"refused": 0})
    out = tmp_path / "g.json"
    assert gpu_check.main(["--device", "cpu", "--model", "a", "b", "--images", "1", "--out", str(out)]) == 0
    assert order == ["exact", "exact", "dd", "dd"]
    assert json.loads(out.read_text()) == {m: {"pixels_equal": True, "device_decode": {"refused": 0}} for m in "ab"}


def test_driver_stage_carries_replayed_results_into_parquet(ray_cluster, tmp_path):
    """The real pool, driver loop and writer with the model's outputs replayed: every row written once."""
    out = driver_stage.measure(600, 64, str(tmp_path))
    assert out["rows_read_back"] == 600 and out["img_per_s"] > 0
    assert out["driver_cpu_ms_per_image"] > 0 and out["actor_cpu_ms_per_image"] > 0
    writer = driver_stage.measure_writer(512, 64, rounds=1)
    assert writer["ours"]["bytes_per_image"] < writer["pyarrow_defaults"]["bytes_per_image"]


def test_a_report_of_the_ceiling_alone_is_written():
    """The first save comes after the ceiling stage, before any end-to-end row exists."""
    cfg = SimpleNamespace(cpus_per_actor=1.0, batch_size=16, device="cpu", kind="small", source="local",
                          num_actors=1, decode_cpus=0, fast_decode=False, peer_cpus_per_actor=1.0,
                          peer_decode_cpus=1.0)
    mem = procmem.MemoryPeak(rss_bytes=2**30, pss_bytes=2**29).as_dict()
    block = {"model": "m", "dtype": "fp32", "runs": {},
             "ceiling": [{"stage": "ceiling (2 threads)", "threads": 2, "batch": 16, "rate": 37.0, "memory": mem}]}
    assert "| ceiling (2 threads) | – | 16 | 37.0 | – | – | 1,024 | 512 | – | 0.00 |" in report.format_block(cfg, block)


def test_ceiling_on_cpu_includes_one_process_per_core_side_by_side(tiny_checkpoint, tmp_path, monkeypatch):
    """The data-parallel ceiling: ours' single-threaded actors run so, and two such processes can
    outrun one 2-thread process (48 against 41 img/s here once), so the report's best must see it."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = SimpleNamespace(device="cpu", ceiling_threads=[1], batch_size=2, batch_sizes=[2], ceiling_seconds=0.5,
                          logs=tmp_path, timeout=300)
    rows = throughput.measure_ceiling(cfg, tiny_checkpoint, "fp32")
    assert [r["stage"] for r in rows] == ["ceiling (1 thread)", "ceiling (2 x 1-thread processes)"]
    single, parallel = rows
    assert parallel["batch"] == 2 and parallel["rate"] > 0 and parallel["threads"] == "2 x 1"
    assert parallel["memory"]["peak_rss_mib"] > single["memory"]["peak_rss_mib"]  # two processes' worth
    assert parallel["memory"]["other_cores"] < 0.6  # the sibling's CPU is not "other work"
    assert len(list(tmp_path.glob("*.parallel*.log"))) == 2


def test_device_probe_samples_the_new_run_and_its_newest_actor(tmp_path):
    """device_probe.sh ignores the invocations before it, waits for the new ours log's first
    result, then samples the machine's processes and hands the newest scoring actor to py-spy."""
    probe = Path(__file__).resolve().parents[1] / "benchmarks" / "device_probe.sh"
    logs = tmp_path / "logs"
    (logs / "old").mkdir(parents=True)
    (logs / "old" / "ours-m-10.log").write_text("progress: first 16 images after 1.0 s\n")  # an earlier step's
    spy = tmp_path / "py-spy"  # records the pid it was given, where py-spy writes its stacks
    spy.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case $1 in --pid) p=$2;; -o) o=$2;; esac; shift; done\n'
                   'echo "sampled $p" > "$o"\n')
    spy.chmod(0o755)
    actors = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ray::ScoringActor"])
              for _ in range(2)]
    try:
        run = subprocess.Popen(["bash", str(probe), str(logs), str(tmp_path / "probe-x"), "30", str(spy)])
        time.sleep(1.5)
        assert not (tmp_path / "probe-x-top.txt").exists()  # the old log's first result is not this run's
        (logs / "new").mkdir()
        (logs / "new" / "ours-m-10.log").write_text("scoring...\nprogress: first 16 images after 1.0 s\n")
        assert run.wait(timeout=30) == 0
    finally:
        for a in actors:
            a.kill()
            a.wait()
    assert (tmp_path / "probe-x-top.txt").read_text().startswith(f"sampling during {logs / 'new'}")
    assert (tmp_path / "probe-x-actor.txt").read_text() == f"sampled {actors[-1].pid}\n"
