"""What the service leaves on disk, kept bounded: leftovers of killed processes, and caches by last use.

Files written under a temporary name and renamed into place once complete (prepared decoders,
downloaded trained files, their index) carry the writing process's pid in that name: a process killed
mid-write leaves them behind, and :func:`remove_leftovers` removes those whose process no longer runs
(or, without a pid, older than :data:`LEFTOVER_SECONDS`), at setup. Caches that grow with use (one
prepared decoder per checkpoint, settings and machine; one file per trained version served) are
bounded by :func:`evict_least_recent`: past a size, the entries used least recently go first, never
the one in use.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from .logs import get_logger

log = get_logger()

LEFTOVER_SECONDS = 24 * 3600.0  # a temporary without a pid is a leftover after this long


HASH_BLOCK = 16 << 20


def sha256_of(path: Path) -> str:
    """The sha256 of a file's content, read in blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def alive(pid: int) -> bool:
    """Whether a process of that pid runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Remove a file or a folder; one that is gone already is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(folder: Path, pattern: str, now: tp.Optional[float] = None) -> int:
    """Remove the entries of ``folder`` named by ``pattern`` (a regular expression; a group named
    ``pid`` gives the writer's pid) left by processes that no longer run, or, without a pid, older than
    :data:`LEFTOVER_SECONDS`. Returns how many; never raises."""
    now = time.time() if now is None else now
    regex = re.compile(pattern)
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = regex.fullmatch(entry.name)
        if match is None:
            continue
        try:
            pid = match.groupdict().get("pid")
            if pid is not None:
                stale = int(pid) != os.getpid() and not alive(int(pid))
            else:
                stale = now - entry.lstat().st_mtime > LEFTOVER_SECONDS
            if stale:
                remove(entry)
                removed += 1
        except OSError as exc:
            log.info("could not remove the leftover %s (%s)", entry, exc.strerror or exc)
    if removed:
        log.info("removed %d leftover(s) of stopped processes from %s", removed, folder)
    return removed


@dataclass
class Entry:
    path: Path
    size: int
    last_used: float


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def evict_least_recent(entries: tp.Iterable[Entry], max_bytes: int, keep: tp.Iterable[Path] = ()) -> tp.List[Path]:
    """Remove entries, least recently used first, until the rest fit in ``max_bytes``; ``keep`` (the
    entry in use) is never removed. Returns what was removed; never raises."""
    kept = {Path(p) for p in keep}
    ordered = sorted(entries, key=lambda e: e.last_used)
    total = sum(e.size for e in ordered)
    removed = []
    for e in ordered:
        if total <= max_bytes:
            break
        if e.path in kept:
            continue
        try:
            remove(e.path)
        except OSError as exc:
            log.info("could not remove %s from the cache (%s)", e.path, exc.strerror or exc)
            continue
        total -= e.size
        removed.append(e.path)
    if removed:
        log.info(
            "cache over %.1f GB: removed the %d least recently used: %s",
            max_bytes / 1e9,
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed
