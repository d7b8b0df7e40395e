"""The CPU allocator tuning takes effect: a 64 MiB tensor comes from the heap, not an mmap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Prints mmapped bytes (mallinfo2().hblkhd) while a 64 MiB tensor is alive, and the tuning's result.
PROBE = """
import ctypes, ctypes.util, json, torch
from moe_diffuseq.allocator import tune_cpu_allocator
tuned = tune_cpu_allocator()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
big = torch.ones(16 << 20)  # 64 MiB
print(json.dumps({"tuned": tuned, "mmapped_mb": (libc.mallinfo2().hblkhd - before) / 2**20,
                  "sum": float(big.sum())}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_keeps_large_tensors_out_of_fresh_mmaps_and_can_be_turned_off():
    tuned, default = _probe(), _probe(MOE_DIFFUSEQ_MALLOC_TUNING="0")
    assert tuned["tuned"] is True and default["tuned"] is False
    assert default["mmapped_mb"] >= 64  # glibc's default: a fresh mmap for the tensor
    assert tuned["mmapped_mb"] < 1  # tuned: served from the heap, recycled step to step
    assert tuned["sum"] == default["sum"] == float(16 << 20)
