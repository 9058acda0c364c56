"""deit_model.host_memory: freed buffers are reused, not faulted back in every batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A forward pass's pattern: allocate, write and free the same large buffers over and over
# (with glibc's own malloc: numpy and torch may add huge pages of their own). Run in a
# fresh interpreter, since the setting is process-wide and lasts.
_LOOP = """
import ctypes, json, resource, sys
from deit_model.host_memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
tuned = keep_freed_memory() if sys.argv[1] == "1" else False

def touch(n):  # as a tensor's buffer is written: every page
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p

for p in [touch(48 * 2**20)]:  # one pass first, as a warm actor has had
    libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    blocks = [touch(48 * 2**20), touch(2 * 2**20)]  # above and below glibc's largest mmap threshold
    for p in blocks:
        libc.free(p)
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _loop(tune: bool, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOOP, "1" if tune else "0"], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, tuned = _loop(False), _loop(True)
    assert tuned["tuned"] is True
    pages = 20 * 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] > pages  # glibc unmaps each 48 MiB block and faults it in again
    assert tuned["faults"] < pages / 20  # the same pages, reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_users_malloc_setting_wins():
    left = _loop(True, MALLOC_TRIM_THRESHOLD_="131072")
    assert left["tuned"] is False
    assert left["faults"] > 20 * 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
