"""Where output files live until Cog has delivered them, and how disk use stays bounded.

Each prediction (and each training) writes into a fresh folder of its own (``musicgen-out-<pid>-*``
in the temp directory), so concurrent work never shares a file. A file must outlive its prediction:
Cog reads it (uploads it, or encodes it into the response) after ``predict`` returns, and a user may
feed it back as the next request's ``input_audio``. So nothing is removed when the next prediction
starts. Instead:

- at each prediction, this process's folders older than :data:`KEEP_SECONDS` are removed (Cog
  delivers a file within seconds of its prediction's end), except folders still in use: a folder is
  held (:func:`held`) while its prediction or training writes into it (a stream or a training may
  take longer than the keep period, and writes into subfolders, which does not touch the folder's
  own time), and its age counts from its release;
- cleaning never fails the work that asked for it: one thread cleans at a time (another asking
  meanwhile skips its turn: the folders are the same), a folder that vanished is not an error, and
  any other failure is logged;
- at setup, folders of processes that no longer exist (a killed worker) are removed, whatever their
  age; other live processes' folders are left alone;
- at exit, this process's folders are removed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

from . import disk
from .logs import get_logger

log = get_logger()

PREFIX = "musicgen-out-"
KEEP_SECONDS = 600.0

_CLEANING = threading.Lock()
_HELD: tp.Dict[Path, int] = {}  # folder -> holders
_HELD_LOCK = threading.Lock()


def fresh_folder() -> Path:
    """A new private folder for one prediction's (or training's) output."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


@contextlib.contextmanager
def held(folder: Path) -> tp.Iterator[Path]:
    """Within the block, cleaning leaves ``folder`` alone; its keep period starts when the block ends."""
    folder = Path(folder)
    with _HELD_LOCK:
        _HELD[folder] = _HELD.get(folder, 0) + 1
    try:
        yield folder
    finally:
        with _HELD_LOCK:
            _HELD[folder] -= 1
            if not _HELD[folder]:
                del _HELD[folder]
        with contextlib.suppress(OSError):
            os.utime(folder)


def is_held(folder: Path) -> bool:
    with _HELD_LOCK:
        return Path(folder) in _HELD


def remove_folder(folder: tp.Optional[Path]) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _owner(folder: Path) -> tp.Optional[int]:
    try:
        return int(folder.name[len(PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def _ours() -> tp.Iterator[Path]:
    yield from Path(tempfile.gettempdir()).glob(f"{PREFIX}*")


def _age(folder: Path, now: float) -> tp.Optional[float]:
    try:
        return now - folder.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile (by this process's exit, or a user's tmp cleaner)
        return None


def _sweep(select: tp.Callable[[Path], bool], wait: float = 0.0) -> int:
    """Remove the folders ``select`` picks; never raises (a failure is logged). One sweep at a time:
    a thread that finds another sweeping waits ``wait`` seconds for it, then returns 0."""
    if not _CLEANING.acquire(timeout=wait):
        return 0
    removed = 0
    try:
        for folder in _ours():
            try:
                if select(folder):
                    remove_folder(folder)
                    removed += 1
            except OSError as exc:
                log.info("output folders: could not clean %s (%s)", folder, exc.strerror or exc)
    except Exception as exc:  # listing the temp directory failed: the next sweep tries again
        log.info("output folders: cleaning skipped (%s: %s)", type(exc).__name__, exc)
    finally:
        _CLEANING.release()
    return removed


def remove_expired(now: tp.Optional[float] = None, keep_seconds: float = KEEP_SECONDS) -> int:
    """Remove this process's folders older than ``keep_seconds`` and not held; returns how many.
    Never raises."""
    now = time.time() if now is None else now
    pid = os.getpid()

    def expired(folder: Path) -> bool:
        if _owner(folder) != pid or is_held(folder):
            return False
        age = _age(folder, now)
        return age is not None and age > keep_seconds

    return _sweep(expired)


def remove_orphans() -> int:
    """Remove the folders of processes that no longer exist (a killed worker's); returns how many."""
    pid = os.getpid()

    def orphan(folder: Path) -> bool:
        owner = _owner(folder)
        return owner is not None and owner != pid and not disk.alive(owner)

    return _sweep(orphan)


_AT_EXIT: tp.List[int] = []


def remove_all_at_exit() -> None:
    """At this process's exit, remove all its folders (registered once per process)."""
    pid = os.getpid()
    if pid not in _AT_EXIT:
        _AT_EXIT.append(pid)
        atexit.register(lambda: _sweep(lambda folder: _owner(folder) == pid, wait=5.0))
