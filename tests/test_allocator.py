"""The trainer's CPU allocator settings (lmim.train.allocator): freed activations are reused.

Each case runs in its own process, since malloc settings are process-wide: a loop that allocates
and frees the same large tensors, as a training step does, is served from the heap and stops
touching fresh pages once the settings are applied; with glibc's defaults each large tensor is a
fresh mmap.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc malloc's")

_STEP_LOOP = r"""
import ctypes, json, resource
import torch
from lmim.train.allocator import keep_freed_memory
line = keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
has_mallinfo2 = hasattr(libc, "mallinfo2")  # glibc >= 2.33
if has_mallinfo2:
    libc.mallinfo2.restype = MallInfo2
def mapped():  # bytes in mmap-served blocks
    return libc.mallinfo2().hblkhd if has_mallinfo2 else 0
def step():  # a step's pattern: several large activations alive together, then all freed
    held = [torch.ones(n, 1024) for n in (2000, 5000, 7000, 3000, 6000, 4000, 7500)]  # 8-30 MB each
    return mapped()  # while they are alive
mapped_before = mapped()
mapped_first_step = step() - mapped_before if has_mallinfo2 else None
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"line": line, "mapped_mb": None if mapped_first_step is None else mapped_first_step / 2**20,
                  "faults_per_step": faults,
                  "pages_per_step": 34500 * 1024 * 4 // 4096}))
"""


def _run(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _STEP_LOOP], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_activations_are_reused_instead_of_faulting_in_fresh_pages():
    tuned = _run({"LMIM_MALLOC_TUNE": "1"})
    default = _run({"LMIM_MALLOC_TUNE": "0"})
    assert tuned["line"].startswith("allocator: glibc malloc keeps freed memory")
    assert default["line"] == "allocator: glibc defaults (LMIM_MALLOC_TUNE=0)"
    # glibc's defaults serve each of these with a fresh mmap (138 MB the first step), tuned the heap does
    if tuned["mapped_mb"] is not None:  # glibc < 2.33 has no mallinfo2 to ask
        assert default["mapped_mb"] > 100 and tuned["mapped_mb"] < 8
    # and later steps reuse the heap instead of faulting in 34,500 fresh pages each (tuned: 0-1,200
    # measured; the defaults' count depends on what else sits on the heap: 0-32,000)
    assert tuned["faults_per_step"] < 0.1 * tuned["pages_per_step"]


def test_the_settings_are_applied_once_and_reported_the_same_way():
    from lmim.train.allocator import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first and first.startswith("allocator: ")
