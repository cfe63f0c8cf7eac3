"""training.allocator: with glibc's mmap threshold fixed, large freed tensors leave the process; with
glibc's default (its dynamic threshold), the same pattern of allocations stays resident. Each case in a
fresh process: the threshold is process-wide, and the default's state depends on what ran before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from musicgen_service.training import allocator

ROOT = Path(__file__).resolve().parent.parent

# A step's pattern in small: one large block freed (glibc raises its threshold to its size), then
# blocks below that size interleaved with small ones that stay alive (so the freed blocks cannot be
# trimmed from the top of the heap), then the large ones freed.
SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from musicgen_service.training import allocator

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

fixed = allocator.map_large_blocks(int(sys.argv[2]))
first = torch.ones(16 * 2**18)  # 16 MiB, mapped by either, then freed
del first
big, small = [], []
for _ in range(24):
    big.append(torch.ones(6 * 2**18))  # 6 MiB, pages touched
    small.append(torch.ones(2**17))  # 512 KiB: from the heap either way, right after its big one
before = rss_mb()
del big
print("RESULT " + json.dumps({"fixed": fixed, "released_mb": before - rss_mb()}))
"""


def _released(threshold: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT), str(threshold)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_fixed_threshold_returns_freed_tensors_and_the_default_keeps_them():
    stock = _released(0)
    fixed = _released(allocator.THRESHOLD)
    assert not stock["fixed"] and fixed["fixed"]
    assert fixed["released_mb"] > 120, fixed  # 144 MiB freed: back to the system
    assert stock["released_mb"] < 40, stock  # the same, kept in glibc's heap


def test_zero_leaves_the_allocator_alone():
    assert allocator.map_large_blocks(0) is False
