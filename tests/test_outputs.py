"""Output folders: one per prediction, kept until delivered, bounded by age, orphans removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from musicgen_service.core import folders as outputs


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


def _expired_folders(n: int) -> list:
    """``n`` folders of this process, past their keep period (a busy server's leftovers)."""
    past = time.time() - outputs.KEEP_SECONDS - 60
    made = []
    for _ in range(n):
        folder = outputs.fresh_folder()
        (folder / "out.wav").write_bytes(b"x")
        os.utime(folder, (past, past))
        made.append(folder)
    return made


def test_concurrent_cleaners_never_fail_and_a_vanished_folder_is_no_error(tmp_path, monkeypatch):
    """Four threads clean at once while another removes folders under them: no exception escapes."""
    import threading

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(outputs.tempfile, "tempdir", None)
    errors = []
    for _ in range(3):
        folders = _expired_folders(1500)
        barrier = threading.Barrier(5)

        def clean() -> None:
            barrier.wait()
            try:
                outputs.remove_expired()
            except Exception as exc:  # the defect: another cleaner's removal raised here
                errors.append(exc)

        def vanish() -> None:  # a user's tmp cleaner, or this process' exit, removing folders meanwhile
            barrier.wait()
            for folder in folders[::3]:
                outputs.remove_folder(folder)

        threads = [threading.Thread(target=clean) for _ in range(4)] + [threading.Thread(target=vanish)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outputs.remove_expired()
    assert not errors, errors[:3]
    assert not list(outputs._ours())


def test_a_held_folder_is_never_removed_and_expires_after_its_release(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(outputs.tempfile, "tempdir", None)
    folder = outputs.fresh_folder()
    past = time.time() - outputs.KEEP_SECONDS - 60
    with outputs.held(folder):
        (folder / "sub").mkdir()  # a training writes in subfolders: the folder's own time stays old
        os.utime(folder, (past, past))
        assert outputs.remove_expired() == 0 and folder.exists()
    assert outputs.remove_expired() == 0 and folder.exists()  # its keep period starts at the release
    assert outputs.remove_expired(now=time.time() + outputs.KEEP_SECONDS + 1) == 1 and not folder.exists()


def test_a_failing_clean_is_logged_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(outputs.tempfile, "tempdir", None)
    _expired_folders(2)

    def broken(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs, "remove_folder", broken)
    assert outputs.remove_expired() == 0
    assert "could not clean" in capsys.readouterr().out
