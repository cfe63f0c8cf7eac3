"""``script/predict`` on a fresh machine: the model's files fetched on first use, and what a CPU user
should expect.

Only the command line does this. A container's setup stays offline (``weights/hub``): its weights are
in the image or a mounted folder, never fetched while it serves.
"""

from __future__ import annotations

import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from ..core.errors import DownloadError, WeightsMissingError
from ..core.settings import PROJECT_ROOT
from ..weights.hub import (
    CPU_MODEL,
    LM_FILE,
    MODEL_PARAMETERS,
    conditioner_files,
    musicgen_folder,
    read_lm_config,
    require,
)

# A whole request against the floor (int8 weights read once per step at the machine's copy bandwidth):
# musicgen-small, 8 s of audio in 15.0 s where 400 steps x 12 ms (360 MB at 30 GB/s) would be 4.8 s, so
# 3.1x (bench/results/step-profile.md, AMD EPYC Zen 4, 2 cores). The same ratio for the larger models is
# an estimate, said as one.
OVERHEAD = 3.1
STEPS_PER_SECOND = 50  # the LM's frame rate: one decoding step per frame of audio


def missing(weights_dir: Path, model: str) -> bool:
    """Whether the weights folder lacks a file ``model`` needs to start (MBD aside: it loads lazily)."""
    try:
        folder = musicgen_folder(weights_dir, model)
        require(weights_dir, conditioner_files(read_lm_config(folder / LM_FILE)), f"the model {model}")
    except WeightsMissingError:
        return True
    return False


def fetch_if_missing(weights_dir: Path, model: str, with_mbd: bool, say: tp.Callable[[str], None]) -> bool:
    """Fetch what ``model`` needs when the folder lacks it, by running ``script/download-weights``'s code
    (huggingface_hub: a progress bar per file; an interrupted download resumes on the next run). In a
    process of its own: this one's setup must be the first to import huggingface_hub, offline
    (``hub.use_hub_cache``). Returns whether anything was fetched; a failed download raises
    :class:`DownloadError` after the download's own one-line reason."""
    if not missing(weights_dir, model):
        return False
    say(
        f"first use: fetching {model} into {weights_dir} (once; an interrupted download resumes; "
        "script/download-weights does the same ahead of time)"
    )
    command = [sys.executable, "-m", "musicgen_service.weights.download", "--model", model]
    command += ["--weights", str(weights_dir)] + ([] if with_mbd else ["--no-mbd"])
    if subprocess.run(command, cwd=PROJECT_ROOT).returncode != 0:
        raise DownloadError(
            f"the first-use download of {model} stopped (the reason is above); "
            "run the same command again: it resumes where it stopped"
        )
    return True


def copy_bandwidth() -> float:
    """This machine's memory bandwidth in bytes/s, from copying 256 MB (read + write), best of three."""
    import numpy as np

    a = np.ones(64 * 1024**2, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best


def cpu_advice(model: str, bandwidth: float) -> tp.Optional[str]:
    """What a CPU user is told: the model's cost per second of audio here, and the model that suits a CPU."""
    params = MODEL_PARAMETERS.get(model)
    if params is None:
        return None

    def per_second(n: float) -> float:  # seconds of compute per second of audio
        return n / bandwidth * OVERHEAD * STEPS_PER_SECOND

    text = (
        f"CPU: {model} ({params / 1e9:.1f}B parameters) takes about {per_second(params):.0f} s per second "
        f"of audio here (estimated from this machine's {bandwidth / 1e9:.0f} GB/s)"
    )
    if model != CPU_MODEL:
        text += (
            f"; {CPU_MODEL} suits a CPU: about {per_second(MODEL_PARAMETERS[CPU_MODEL]):.1f} s per second "
            f"(MUSICGEN_MODEL={CPU_MODEL})"
        )
    return text
