"""glibc's allocator while training on CPUs: large tensors mapped and unmapped, not kept in its heap.

A training step on a CPU allocates and frees gigabytes in blocks of every size (activations saved for
backward, each adapted weight ``W + B @ A``, gradients). glibc raises its mmap threshold each time a
large mapped block is freed (its "dynamic threshold", up to 32 MB), after which blocks of that size
come from the heap, where freed memory is fragmented and stays resident: the process grows with
every step although no tensor outlives it. Setting the threshold (``mallopt(M_MMAP_THRESHOLD)``,
what the ``MALLOC_MMAP_THRESHOLD_`` variable does at start) ends the adjustment: blocks from the
threshold up are mapped, and unmapped when freed.

Measured (bench/train.py's flow, musicgen-small at real size, LoRA, batch 1, AMD EPYC AVX2, 2 cores;
process RSS after each update's backward): with glibc's default, 10 s segments grew 7.5 -> 9.7 ->
12.0 -> 12.0 GB over four updates, 30 s segments 9.4 -> 11.9 -> 13.9 GB over three; with the
threshold set, the 10 s run stayed at 5.9-6.3 GB. At 30 s, each method at batch 1 and 2 side by side
(bench/results/train.md): peaks 28-38% lower, -4% to +13% time per update (the pages of each large
block are faulted in again).

Only on Linux with glibc (elsewhere, and on GPUs where the tensors are not in this heap, nothing to
do); the setting is process-wide and kept, as a training process does nothing else.
"""

from __future__ import annotations

import ctypes
import sys
import typing as tp

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# blocks of 1 MiB and more are mapped (a step's activations and weights are far larger; smaller
# blocks stay in the heap, where their reuse costs no system call); 0: glibc's default left as it is.
# bench/train.py --thresholds compares values.
THRESHOLD = 1 << 20


def map_large_blocks(threshold: tp.Optional[int] = None) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes (default :data:`THRESHOLD`), which fixes it;
    False where nothing was set (0, or not glibc)."""
    threshold = THRESHOLD if threshold is None else threshold
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
