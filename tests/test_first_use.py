"""script/predict on a machine without weights fetches the model's files on first use, from a local
stand-in of the Hugging Face hub (the tiny set's files served over loopback in the hub's resolve API),
and a download cut off half-way resumes on the next run from where it stopped."""

from __future__ import annotations

import os
import subprocess
import threading
import typing as tp
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from musicgen_service.tools.first_use import cpu_advice, missing

ROOT = Path(__file__).resolve().parents[1]


class StandInHub:
    """``/{repo}/resolve/{revision}/{file}`` from a hub cache folder (HEAD and GET, with Range), as
    huggingface_hub's hf_hub_download asks for it. ``cut`` (a file name): its first GET stops half-way
    and the hub answers 503 from then on, until ``cut`` is cleared."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.cut: tp.Optional[str] = None
        self.broken = False
        self.ranges: tp.List[tp.Tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: tp.Any) -> None:
                pass

            def find(self) -> tp.Optional[tp.Tuple[Path, str]]:
                repo, sep, rest = self.path.partition("/resolve/")
                if not sep:
                    return None
                _, _, filename = rest.partition("/")
                folder = hub.cache / ("models--" + repo.strip("/").replace("/", "--"))
                commit = (folder / "refs" / "main").read_text().strip() if (folder / "refs" / "main").exists() else ""
                path = folder / "snapshots" / commit / filename
                return (path, commit) if commit and path.is_file() else None

            def answer(self, body: bool) -> None:
                found = self.find()
                if hub.broken:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, commit = found
                data = path.resolve().read_bytes()
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0] or 0)
                    hub.ranges.append((path.name, self.headers["Range"]))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{path.resolve().name}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if hub.cut == path.name and start == 0:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    hub.broken = True  # the rest of this run gets 503: the command ends, the part stays
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def do_HEAD(self) -> None:
                self.answer(False)

            def do_GET(self) -> None:
                self.answer(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cpu_advice_names_the_cpu_model():
    text = cpu_advice("facebook/musicgen-stereo-melody-large", 20e9)
    assert "3.3B" in text and "facebook/musicgen-small suits a CPU" in text and "20 GB/s" in text
    assert "suits" not in cpu_advice("facebook/musicgen-small", 20e9)
    assert cpu_advice("/my/fine-tune", 20e9) is None  # a local folder: no known size


@pytest.mark.slow
def test_first_use_fetches_then_resumes_an_interrupted_download(tiny_weights, tmp_path):
    hub = StandInHub(tiny_weights)
    weights = tmp_path / "weights"
    model = "facebook/musicgen-small"
    big = max(
        (p for p in (tiny_weights / "models--facebook--musicgen-small" / "snapshots").rglob("*") if p.is_file()),
        key=lambda p: p.resolve().stat().st_size,
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "MUSICGEN_WEIGHTS": str(weights),
        "MUSICGEN_MODEL": model,
        "MUSICGEN_DEVICE": "cpu",
        "MUSICGEN_PREPARED": "off",
    }
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):  # set by this process's tiny set
        env.pop(name, None)
    command = [
        str(ROOT / "script" / "predict"),
        "-i",
        "prompt=lo-fi",
        "-i",
        "duration=1",
        "-o",
        str(tmp_path / "o.wav"),
    ]
    try:
        assert missing(weights, model)
        hub.cut = big.name
        first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 1, first.stderr[-3000:]
        assert "first use: fetching facebook/musicgen-small" in first.stderr
        assert (
            "download-weights: " in first.stderr and "it resumes where it stopped" in first.stderr
        )  # one line saying what to do
        partial = list(weights.rglob("*.incomplete"))
        assert len(partial) == 1  # the part is kept for the next run
        # huggingface_hub writes what it receives in 10 MB pieces, so a cut inside the tiny set's 2.3 MB
        # file leaves the part empty; a real checkpoint's cut leaves its first pieces: write that state
        half = big.resolve().stat().st_size // 2
        partial[0].write_bytes(big.resolve().read_bytes()[:half])
        hub.cut, hub.broken, hub.ranges = None, False, []
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        assert (big.name, f"bytes={half}-") in hub.ranges  # resumed from where the first run stopped
        assert (tmp_path / "o.wav").read_bytes()[:4] == b"RIFF"
        assert not missing(weights, model) and not list(weights.rglob("*.incomplete"))
        fetched = next((weights / "models--facebook--musicgen-small" / "snapshots").rglob(big.name))
        assert fetched.read_bytes() == big.resolve().read_bytes()
        third = subprocess.run(
            command,
            cwd=tmp_path,
            env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert third.returncode == 0 and "first use" not in third.stderr  # present: nothing fetched
    finally:
        hub.close()
