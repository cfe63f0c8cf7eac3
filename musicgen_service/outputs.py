"""Where output files live until Cog has delivered them, and how disk use stays bounded.

Each prediction writes into a fresh folder of its own (``musicgen-out-<pid>-*``
in the temp directory), so concurrent predictions never share a file. A file
must outlive its prediction: Cog reads it (uploads it, or encodes it into the
response) after ``predict`` returns, and a user may feed it back as the next
request's ``input_audio``. So nothing is removed when the next prediction starts.
Instead:

- at each prediction, this process's folders older than :data:`KEEP_SECONDS`
  are removed (Cog delivers a file within seconds of its prediction's end);
- at setup, folders of processes that no longer exist (a killed worker) are
  removed, whatever their age; other live processes' folders are left alone;
- at exit, this process's folders are removed.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import typing as tp
from pathlib import Path

PREFIX = "musicgen-out-"
KEEP_SECONDS = 600.0


def fresh_folder() -> Path:
    """A new private folder for one prediction's output."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def remove_folder(folder: tp.Optional[Path]) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _owner(folder: Path) -> tp.Optional[int]:
    try:
        return int(folder.name[len(PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours() -> tp.Iterator[Path]:
    yield from Path(tempfile.gettempdir()).glob(f"{PREFIX}*")


def remove_expired(now: tp.Optional[float] = None, keep_seconds: float = KEEP_SECONDS) -> int:
    """Remove this process's folders older than ``keep_seconds``; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for folder in _ours():
        if _owner(folder) == os.getpid() and now - folder.stat().st_mtime > keep_seconds:
            remove_folder(folder)
            removed += 1
    return removed


def remove_orphans() -> int:
    """Remove the folders of processes that no longer exist (a killed worker's); returns how many."""
    removed = 0
    for folder in _ours():
        owner = _owner(folder)
        if owner is not None and owner != os.getpid() and not _alive(owner):
            remove_folder(folder)
            removed += 1
    return removed


def remove_all_at_exit() -> None:
    atexit.register(lambda: remove_expired(keep_seconds=-1.0))
