"""A few seconds of the device's own timeline, recorded inside a scoring process.

py-spy shows where a process's threads spend their time on the host; it cannot
show whether the GPU was busy meanwhile, which is what says whether the model or
what feeds it bounds a run (docs/benchmarks.md). :class:`WindowProfiler` records
the device's kernels and copies, and the CUDA runtime calls of every thread, with
``torch.profiler`` over one window of wall time, and writes them as a Chrome trace
with a note of the window's length and the images scored in it;
``benchmarks/device_profile.py`` reads them back (how much of the window some
kernel ran, the kernels and waits that took the most time). It is off unless
asked for: the scoring actor asks when ``DEIT_PROFILE_DIR`` is set
(:func:`profiler_from_env`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_DIR, ENV_WINDOW = "DEIT_PROFILE_DIR", "DEIT_PROFILE_WINDOW"


class WindowProfiler:
    """Profiles for ``seconds``, ``delay`` seconds after the first call it is told of.

    torch's profiler must start and stop on one thread and records the host
    operators of that thread only, so it runs on a thread of its own: what it
    keeps is the device's activity (CUPTI sees the whole device, whichever thread
    launched the work) and the runtime calls. Its trace is written by the
    profiler's C++ side, so the scoring threads keep the interpreter meanwhile.
    """

    def __init__(self, out_dir: str | os.PathLike, delay: float = 3.0, seconds: float = 2.0):
        self.out_dir, self.delay, self.seconds = Path(out_dir), delay, seconds
        self._lock, self._images, self._thread = threading.Lock(), 0, None

    def on_call(self, images: int) -> None:
        """Count a finished call's images; the first call starts the timer."""
        with self._lock:
            self._images += images
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="device-profile", daemon=True)
                self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the window's files are written (or it failed)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        # about a profiler with a schedule of cycles; this one has a single window
        warnings.filterwarnings("ignore", message="Profiler clears events", category=UserWarning)
        time.sleep(self.delay)
        cuda = torch.cuda.is_available()
        try:
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                start, images = time.perf_counter(), self._count()
                time.sleep(self.seconds)
                wall, images = time.perf_counter() - start, self._count() - images
            self.out_dir.mkdir(parents=True, exist_ok=True)
            stem = self.out_dir / f"device-profile-{os.getpid()}"
            prof.export_chrome_trace(f"{stem}.trace.json")
            note = {"wall_s": wall, "images": images, "device": "cuda" if cuda else "cpu",
                    "trace": f"{stem.name}.trace.json", "started_after_first_call_s": self.delay}
            Path(f"{stem}.json").write_text(json.dumps(note, indent=2))
            logger.info("device profile written: %s.json (%d images in %.1f s)", stem, images, wall)
        except Exception:  # noqa: BLE001 - a diagnostic must not fail a run
            logger.warning("device profile failed", exc_info=True)

    def _count(self) -> int:
        with self._lock:
            return self._images


def profiler_from_env() -> WindowProfiler | None:
    """A :class:`WindowProfiler` into ``$DEIT_PROFILE_DIR`` (``$DEIT_PROFILE_WINDOW``: "delay,seconds"), else None."""
    out = os.environ.get(ENV_DIR)
    if not out:
        return None
    window = os.environ.get(ENV_WINDOW, "3,2")
    try:
        delay, seconds = (float(v) for v in window.split(","))
    except ValueError:  # a diagnostic's typo must not stop the actor
        logger.warning("%s=%r is not 'delay,seconds'; profiling 2 s, 3 s after the first call", ENV_WINDOW, window)
        delay, seconds = 3.0, 2.0
    return WindowProfiler(out, delay, seconds)
