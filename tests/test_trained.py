"""Trained files from anyone: crafted files are refused before they touch the model, and URLs are
downloaded within a size and a deadline, never downgraded, never logged with their query."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import typing as tp
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import MONO_TEXT
from safetensors.torch import save_file

from musicgen_service.core.errors import TrainedError
from musicgen_service.core.settings import Settings
from musicgen_service.serving.service import Service
from musicgen_service.weights import fetch, trained
from musicgen_service.weights import hub as weights


def base_state(tiny_weights: Path) -> tp.Dict[str, torch.Tensor]:
    lm = weights.musicgen_folder(tiny_weights, MONO_TEXT) / weights.LM_FILE
    return torch.load(lm, map_location="cpu", mmap=True, weights_only=True)["best_state"]


def manifest(tiny_weights: Path, **fields: tp.Any) -> tp.Dict[str, tp.Any]:
    lm = weights.musicgen_folder(tiny_weights, MONO_TEXT) / weights.LM_FILE
    return {
        "format": trained.FORMAT,
        "base_model": MONO_TEXT,
        "base_checkpoint": weights.checkpoint_identity(lm),
        "method": "lora",
        "rank": 2,
        "alpha": 2.0,
        "training": {"steps": 1},
        "final_loss": 1.0,
        **fields,
    }


def lora_tensors(tiny_weights: Path, rank: int = 2) -> tp.Dict[str, torch.Tensor]:
    state = base_state(tiny_weights)
    name = "transformer.layers.0.self_attn.in_proj_weight"
    out, inp = state[name].shape
    return {f"{name}.lora_A": torch.randn(rank, inp).half(), f"{name}.lora_B": torch.randn(out, rank).half() * 0.01}


def write(path: Path, tensors: tp.Dict[str, torch.Tensor], meta: tp.Any) -> Path:
    save_file(tensors, str(path), metadata={trained.MANIFEST_KEY: meta if isinstance(meta, str) else json.dumps(meta)})
    return path


def serve(tiny_weights: Path, path: Path) -> Service:
    return Service(
        Settings(weights_dir=tiny_weights, model=MONO_TEXT, device="cpu", decoder="exact", prepared_off=True),
        trained=str(path),
    )


def crafted(tiny_weights: Path, case: str) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Any]:
    t, m = lora_tensors(tiny_weights), manifest(tiny_weights)
    name = "transformer.layers.0.self_attn.in_proj_weight"
    if case == "not-an-object":
        return t, "[1, 2, 3]"
    if case == "rank-0":
        return t, {**m, "rank": 0}
    if case == "alpha-nan":
        return t, json.dumps({**m, "alpha": float("nan")})  # JSON's NaN, which json.loads accepts
    if case == "missing-tensor":
        del t[f"{name}.lora_B"]
        return t, m
    if case == "one-element":  # broadcasts into the whole weight if not checked
        t = lora_tensors(tiny_weights, rank=1)
        t[f"{name}.lora_B"] = torch.ones(1, 1).half()
        return t, {**m, "rank": 1}
    if case == "nan-values":
        t[f"{name}.lora_A"][0, 0] = float("nan")
        return t, m
    if case == "integers":
        t[f"{name}.lora_A"] = torch.ones_like(t[f"{name}.lora_A"], dtype=torch.int16)
        return t, m
    if case == "unknown-weight":
        t = {
            "transformer.layers.99.linear1.weight.lora_A": torch.ones(2, 4).half(),
            "transformer.layers.99.linear1.weight.lora_B": torch.ones(4, 2).half(),
        }
        return t, m
    if case == "method":
        return t, {**m, "method": "dora"}
    if case == "full-wrong-shape":
        state = base_state(tiny_weights)
        full = {k: v.clone() for k, v in state.items()}
        full["linears.0.weight"] = torch.ones(3, 3)
        return full, {**m, "method": "full"}
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("not-an-object", "not a JSON object"),
        ("rank-0", "LoRA rank is 0"),
        ("alpha-nan", "LoRA alpha is nan"),
        ("missing-tensor", "lora_B is missing"),
        ("one-element", "needs [96, 1]"),
        ("nan-values", "NaN or infinite"),
        ("integers", "holds torch.int16 values"),
        ("unknown-weight", "which is no weight matrix"),
        ("method", "its method is 'dora'"),
        ("full-wrong-shape", "linears.0.weight is [3, 3]"),
    ],
)
def test_a_crafted_trained_file_is_refused_before_the_model_loads(tiny_weights, tmp_path, case, fragment, monkeypatch):
    tensors, meta = crafted(tiny_weights, case)
    path = write(tmp_path / "crafted.safetensors", tensors, meta)
    from musicgen_service.weights import loading

    def never(*args: tp.Any, **kwargs: tp.Any) -> None:
        raise AssertionError("the model was loaded for a file that cannot be served")

    monkeypatch.setattr(loading, "load_musicgen", never)
    start = time.perf_counter()
    with pytest.raises(TrainedError) as info:
        serve(tiny_weights, path)
    assert time.perf_counter() - start < 10
    assert "crafted.safetensors" in str(info.value) and fragment in str(info.value), info.value


def test_a_good_file_passes_the_same_checks(tiny_weights, tmp_path):
    path = write(tmp_path / "good.safetensors", lora_tensors(tiny_weights), manifest(tiny_weights))
    trained.validate(trained.Trained(path), {k: tuple(v.shape) for k, v in base_state(tiny_weights).items()})


# ------------------------------------------------------------------ downloads


class _Files(BaseHTTPRequestHandler):
    files: tp.Dict[str, bytes] = {}
    trickle: tp.Set[str] = set()
    redirects: tp.Dict[str, str] = {}
    no_length: tp.Set[str] = set()

    def log_message(self, *args: tp.Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[path])
            self.end_headers()
            return
        data = self.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        if path not in self.no_length and path not in self.trickle:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if path in self.trickle:
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(data)


@pytest.fixture()
def files_server():
    _Files.files, _Files.trickle, _Files.redirects, _Files.no_length = {}, set(), {}, set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_signed_url_is_never_logged_nor_stored_with_its_query(files_server, tmp_path, capsys):
    _Files.files["/v1/lora.safetensors"] = b"weights" * 100
    url = f"{files_server}/v1/lora.safetensors?X-Amz-Signature=SECRET123&X-Amz-Credential=KEY456"
    got = fetch.resolve(url, tmp_path)
    assert got.read_bytes() == b"weights" * 100
    stored = (tmp_path / "urls.json").read_text()
    logged = capsys.readouterr().out
    for secret in ("SECRET123", "KEY456"):
        assert secret not in logged and secret not in stored
    assert "/v1/lora.safetensors?..." in logged
    assert fetch.redacted("https://user:pw@host:8443/a/b?sig=1#f") == "https://host:8443/a/b?..."


@pytest.mark.parametrize("length", ["declared", "chunked"])
def test_a_download_past_the_size_cap_is_refused(files_server, tmp_path, monkeypatch, length):
    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", 10_000)
    _Files.files["/big"] = bytes(50_000)
    if length == "chunked":
        _Files.no_length.add("/big")
    with pytest.raises(TrainedError, match="the limit"):
        fetch.resolve(f"{files_server}/big", tmp_path)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".download-*"))


def test_a_trickling_server_is_given_up_at_the_deadline(files_server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "DOWNLOAD_SECONDS", 1.0)
    _Files.files["/slow"] = bytes(2000)  # 100 s at one byte every 50 ms
    _Files.trickle.add("/slow")
    start = time.perf_counter()
    with pytest.raises(TrainedError, match="took longer than 1 s"):
        fetch.resolve(f"{files_server}/slow", tmp_path)
    assert time.perf_counter() - start < 5


def test_redirects_never_go_down_to_http_nor_elsewhere(files_server):
    import urllib.request

    handler = fetch._Redirects()
    secure = urllib.request.Request("https://storage.example/w.safetensors?sig=S")
    with pytest.raises(TrainedError, match="from https to http"):
        handler.redirect_request(secure, None, 302, "Found", {}, "http://evil.example/w.safetensors")
    with pytest.raises(TrainedError, match="redirects to a file URL"):
        handler.redirect_request(secure, None, 302, "Found", {}, "file:///etc/passwd")
    plain = urllib.request.Request("http://a.example/w")
    assert handler.redirect_request(plain, None, 302, "Found", {}, "https://b.example/w") is not None


def test_leftovers_of_killed_downloads_are_swept_and_the_store_is_bounded(files_server, tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".download-{pid}-abc").write_bytes(b"partial")
    (tmp_path / f".urls-{pid}.json").write_text("{}")
    mine = tmp_path / f".download-{os.getpid()}-live"
    mine.write_bytes(b"being written")
    monkeypatch.setattr(fetch, "MAX_STORED_BYTES", 2500)
    paths = []
    for i in range(3):
        _Files.files[f"/v{i}"] = bytes([i]) * 1000
        paths.append(fetch.resolve(f"{files_server}/v{i}", tmp_path))
        time.sleep(0.02)
    assert not (tmp_path / f".download-{pid}-abc").exists() and not (tmp_path / f".urls-{pid}.json").exists()
    assert mine.exists()  # this process's own temporary is not a leftover
    assert [p.exists() for p in paths] == [False, True, True]  # the least recently used went first
    assert paths[2].name == hashlib.sha256(bytes([2]) * 1000).hexdigest() + ".safetensors"
