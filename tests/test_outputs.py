"""Output folders: one per prediction, kept until delivered, bounded by age, orphans removed."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from musicgen_service import outputs


def test_expired_folders_of_this_process_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(outputs.tempfile, "tempdir", None)  # tempfile caches the directory
    old, new = outputs.fresh_folder(), outputs.fresh_folder()
    (old / "a.wav").write_bytes(b"x")
    past = time.time() - outputs.KEEP_SECONDS - 5
    os.utime(old, (past, past))
    assert outputs.remove_expired() == 1
    assert not old.exists() and new.exists()
    assert str(os.getpid()) in new.name


def test_orphans_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(outputs.tempfile, "tempdir", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{outputs.PREFIX}{int(dead.stdout)}-abc"
    orphan.mkdir()
    live = tmp_path / f"{outputs.PREFIX}1-def"  # pid 1 is alive
    live.mkdir()
    mine = outputs.fresh_folder()
    assert outputs.remove_orphans() == 1
    assert not orphan.exists() and live.exists() and mine.exists()
