"""A training as ``train.py`` (Cog) and ``script/train`` start it: settings from the environment,
inputs checked, a fresh output folder, the run; nothing is returned unless it all succeeded. One
training runs at a time in a process (a server may accept several: the others wait). Under torchrun
every process runs this, and only rank 0 returns the result (None elsewhere: :mod:`.parallel`)."""

from __future__ import annotations

import shutil
import threading
import typing as tp
from pathlib import Path

from ..core.logs import get_logger

log = get_logger()
_ONE_AT_A_TIME = threading.Lock()


def train(
    *,
    dataset: tp.Union[str, Path],
    base_model: tp.Optional[str] = None,
    sample_seconds: tp.Optional[int] = None,
    cancelled: tp.Callable[[], bool] = lambda: False,
    **inputs: tp.Any,
) -> tp.Any:
    from ..core import folders
    from ..core.settings import Settings
    from . import options, run

    settings = Settings.from_env()
    o = options.parse(
        base_model=base_model, default_model=settings.model, model_width=run.model_width(settings), **inputs
    )
    log.info(
        "training %s (%s) with seed %d: %s",
        o.base_model,
        o.method,
        o.seed,
        ", ".join(f"{k}={v}" for k, v in o.asdict().items() if k not in ("base_model", "method", "seed")),
    )
    folders.remove_expired()
    folders.remove_all_at_exit()
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        log.info("another training is running in this process: this one starts when it ends")
        while not _ONE_AT_A_TIME.acquire(timeout=1.0):
            if cancelled():
                from ..core.errors import Cancelled

                raise Cancelled("training cancelled while waiting")
    folder = folders.fresh_folder()  # (kept after the run, until Cog has uploaded its files)
    try:
        with folders.held(folder):  # never cleaned while the run writes into it (for longer than the keep period)
            result = run.run(
                Path(dataset),
                o,
                settings,
                folder,
                cancelled=cancelled,
                sample_seconds=run.SAMPLE_SECONDS if sample_seconds is None else sample_seconds,
            )
        if result is None:  # (another rank writes the files)
            shutil.rmtree(folder, ignore_errors=True)
        return result
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no partial weights
        raise
    finally:
        _ONE_AT_A_TIME.release()
