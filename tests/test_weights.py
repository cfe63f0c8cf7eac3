"""The weights folder: hub layout, missing-file errors, local checkpoints, downloads."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
import typing as tp
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from musicgen_service.weights import hub as weights
from musicgen_service.weights.hub import HubFile, WeightsMissingError

ROOT = Path(__file__).resolve().parent.parent


def test_written_repo_is_read_by_huggingface_hub(tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    cache = tmp_path / "cache"
    snapshot = weights.write_repo(cache, "org/name", {"a.bin": src})
    found = try_to_load_from_cache("org/name", "a.bin", cache_dir=str(cache))
    assert found == str(snapshot / "a.bin")
    assert (snapshot / "a.bin").is_symlink() and (snapshot / "a.bin").read_bytes() == b"hello"
    info = scan_cache_dir(cache)  # the hub's own validator of the layout
    assert not info.warnings
    assert [r.repo_id for r in info.repos] == ["org/name"]


def test_missing_model_names_the_files_and_the_command(tmp_path):
    with pytest.raises(WeightsMissingError) as info:
        weights.musicgen_folder(tmp_path, "facebook/musicgen-small")
    message = str(info.value)
    assert "facebook/musicgen-small/state_dict.bin" in message
    assert "facebook/musicgen-small/compression_state_dict.bin" in message
    assert "script/download-weights" in message and str(tmp_path) in message


def test_missing_mbd_names_the_file(tmp_path):
    with pytest.raises(WeightsMissingError, match="multiband-diffusion/mbd_musicgen_32khz.th"):
        weights.require(tmp_path, weights.mbd_files(), "multi_band_diffusion")


def test_local_checkpoint_folder_must_hold_both_files(tmp_path):
    (tmp_path / "state_dict.bin").write_bytes(b"")
    with pytest.raises(WeightsMissingError, match="compression_state_dict.bin"):
        weights.musicgen_folder(tmp_path / "unused", str(tmp_path))
    (tmp_path / "compression_state_dict.bin").write_bytes(b"")
    assert weights.musicgen_folder(tmp_path / "unused", str(tmp_path)) == tmp_path


def test_conditioner_files_follow_the_checkpoint_config():
    from omegaconf import OmegaConf

    from musicgen_service.tools import tiny

    text = weights.conditioner_files(OmegaConf.create(tiny.lm_config(1, melody=False)))
    melody = weights.conditioner_files(OmegaConf.create(tiny.lm_config(2, melody=True)))
    assert HubFile("t5-base", "spiece.model") in text
    assert not any(f.repo_id == weights.DEMUCS_REPO for f in text)
    assert HubFile(weights.DEMUCS_REPO, "htdemucs.yaml") in melody


def test_hub_cache_configured_before_import_is_enforced(tmp_path):
    # conftest configured the session's cache before anything imported huggingface_hub;
    # asking for another one now must fail loudly rather than read the wrong folder.
    with pytest.raises(RuntimeError, match="imported before the weights folder was configured"):
        weights.use_hub_cache(tmp_path)


# --- script/download-weights, as a user runs it, against a local peer that speaks the hub's file API


class LocalHub(ThreadingHTTPServer):
    """The hub's file endpoint (HEAD and GET ``/{repo}/resolve/main/{file}``, with ``Range``) over
    the files of a local hub cache. While ``hold`` names a file, a GET of it from byte 0 sends the
    first half as one chunk, then waits for ``release`` (a connection cut in the middle)."""

    def __init__(self, source: Path):
        super().__init__(("127.0.0.1", 0), _LocalHubHandler)
        self.source = source
        self.hold: tp.Optional[HubFile] = None
        self.release = threading.Event()
        self.ranges: tp.List[tp.Tuple[HubFile, int]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _LocalHubHandler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args: tp.Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        repo, _, name = self.path.lstrip("/").partition("/resolve/main/")
        f = HubFile(repo, name)
        path = weights.cached_file(self.server.source, f)
        if path is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        data = path.read_bytes()
        start = int(self.headers.get("Range", "bytes=0-")[len("bytes=") :].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", hashlib.sha1(repo.encode()).hexdigest())
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        if not body:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self.server.ranges.append((f, start))
        if self.server.hold == f and start == 0:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = data[: len(data) // 2]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))
            self.wfile.flush()
            self.server.release.wait(120)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def download_weights(*args: str, **env: str) -> subprocess.Popen:
    """``script/download-weights`` in a user's environment (not the tests' offline hub settings)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "TRANSFORMERS_", "MUSICGEN_")) or k == "MUSICGEN_VENV"
    }
    # Ctrl-C delivered as in a terminal's foreground job: a test run started in the background by a
    # shell without job control inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen(
        [str(ROOT / "script" / "download-weights"), *args],
        env={**base, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def one_line_error(proc: subprocess.Popen, code: int) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_download_without_network_says_so_in_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    err = one_line_error(download_weights("--weights", str(tmp_path), "--no-mbd", HF_ENDPOINT=closed), 1)
    assert err.startswith(f"download-weights: cannot reach the Hugging Face hub ({closed})"), err
    assert "run the command again" in err


def test_download_with_a_bad_setting_or_model_says_so_in_one_line(tmp_path, tiny_weights):
    err = one_line_error(download_weights("--weights", str(tmp_path), MUSICGEN_MBD="sometimes"), 2)
    assert "MUSICGEN_MBD must be one of eager, lazy, off; got 'sometimes'" in err
    hub = LocalHub(tiny_weights)
    err = one_line_error(
        download_weights("--weights", str(tmp_path), "--model", "facebook/musicgen-tiny", HF_ENDPOINT=hub.url), 1
    )
    assert "has no file state_dict.bin" in err, err
    hub.shutdown()


@pytest.mark.slow
def test_interrupted_download_resumes(tmp_path, tiny_weights):
    model, dest = "facebook/musicgen-small", tmp_path / "weights"
    lm = HubFile(model, weights.LM_FILE)
    size = weights.cached_file(tiny_weights, lm).stat().st_size
    hub = LocalHub(tiny_weights)
    hub.hold = lm
    first = download_weights("--model", model, "--weights", str(dest), "--no-mbd", HF_ENDPOINT=hub.url)
    partial = weights.repo_folder(dest, model) / "blobs"
    deadline = time.monotonic() + 120
    while sum(p.stat().st_size for p in partial.glob("*.incomplete")) < size // 2:
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)  # Ctrl-C half-way through
    assert "interrupted: run the command again to resume" in one_line_error(first, 130)
    hub.release.set()

    second = download_weights("--model", model, "--weights", str(dest), "--no-mbd", HF_ENDPOINT=hub.url)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert (lm, size // 2) in hub.ranges, hub.ranges  # asked only for the missing half
    assert weights.cached_file(dest, lm).read_bytes() == weights.cached_file(tiny_weights, lm).read_bytes()
    lm_cfg = weights.read_lm_config(weights.cached_file(dest, lm))
    for f in [HubFile(model, weights.COMPRESSION_FILE), *weights.conditioner_files(lm_cfg)]:
        assert weights.cached_file(dest, f).read_bytes() == weights.cached_file(tiny_weights, f).read_bytes(), f
    hub.shutdown()
