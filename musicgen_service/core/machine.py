"""What this machine's CPU is, as the speed paths and the caches keyed by them need it."""

from __future__ import annotations

import functools
import typing as tp


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tp.Tuple[str, tp.FrozenSet[str]]:
    model, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:  # not Linux: no flags known
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's model name ("" when unknown)."""
    return _cpuinfo()[0]


def cpu_flags() -> tp.FrozenSet[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_int8...), empty when unknown."""
    return _cpuinfo()[1]
