"""Helpers for the HTTP tests: the real Cog server in a subprocess, and a loopback peer that
receives webhooks and uploads and serves input files."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import threading
import time
import typing as tp
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response(tp.NamedTuple):
    status: int
    body: tp.Any
    headers: tp.Dict[str, str]


def request(
    method: str, url: str, body: tp.Any = None, headers: tp.Optional[dict] = None, timeout: float = 120
) -> Response:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        raw, status, hdrs = err.read(), err.code, dict(err.headers)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Response(status, parsed, hdrs)


def data_uri_bytes(uri: str) -> tp.Tuple[str, bytes]:
    header, payload = uri.split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64"), header
    return header[5:-7], base64.b64decode(payload)


class Peer:
    """A loopback HTTP peer: GET serves files from ``folder``; POST bodies (webhooks) and PUT bodies
    (uploads) are recorded."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.webhooks: tp.List[dict] = []
        self.uploads: tp.Dict[str, bytes] = {}
        self.lock = threading.Lock()
        peer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: tp.Any, **kwargs: tp.Any):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args: tp.Any) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self) -> None:  # webhook
                body = self._body()
                with peer.lock:
                    peer.webhooks.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def do_PUT(self) -> None:  # upload
                body = self._body()
                with peer.lock:
                    peer.uploads[self.path] = body
                self.send_response(201)
                self.send_header("Location", f"http://127.0.0.1:{peer.port}/stored{self.path}")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_logs(self, prediction_id: str, text: str = "generated ", timeout: float = 60) -> None:
        """Until a webhook of the prediction carries ``text`` in its logs (by default a progress
        line: generation is under way)."""
        deadline = time.time() + timeout
        while True:
            with self.lock:
                if any(w.get("id") == prediction_id and text in (w.get("logs") or "") for w in self.webhooks):
                    return
            if time.time() > deadline:
                raise TimeoutError(f"{prediction_id}: no webhook with {text!r} in its logs")
            time.sleep(0.05)

    def final_webhook(self, prediction_id: str, timeout: float = 120) -> dict:
        terminal = {"succeeded", "failed", "canceled"}
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                done = [w for w in self.webhooks if w.get("id") == prediction_id and w.get("status") in terminal]
            if done:
                return done[-1]
            time.sleep(0.05)
        raise TimeoutError(f"no final webhook for {prediction_id}")


class CogServer:
    """``script/serve`` on a free loopback port, logs to a file."""

    def __init__(
        self,
        weights: Path,
        log_path: Path,
        upload_url: tp.Optional[str] = None,
        env: tp.Optional[dict] = None,
        train: bool = False,
        stream: bool = False,
        loop: bool = False,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [str(ROOT / "script" / "serve"), "--port", str(self.port)]
        if upload_url:
            args += ["--upload-url", upload_url]
        if train:
            args += ["--train"]
        if stream:
            args += ["--stream"]
        if loop:
            args += ["--loop"]
        environment = {**os.environ, "MUSICGEN_WEIGHTS": str(weights), "MUSICGEN_DEVICE": "cpu", **(env or {})}
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def health(self) -> dict:
        return request("GET", f"{self.url}/health-check", timeout=5).body

    def wait(self, until: tp.Iterable[str] = ("READY",), timeout: float = 180) -> tp.List[str]:
        """Poll /health-check until a status in ``until``; returns the statuses seen, in order."""
        seen: tp.List[str] = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                status = self.health()["status"]
            except (OSError, TypeError, KeyError):
                status = "UNREACHABLE"
            if not seen or seen[-1] != status:
                seen.append(status)
            if status in until:
                return seen
            time.sleep(0.1)
        raise TimeoutError(f"server not {until} after {timeout} s: {seen}; {self.log_path.read_text()[-3000:]}")

    def predict(
        self,
        inputs: dict,
        prediction_id: tp.Optional[str] = None,
        asynchronous: bool = False,
        webhook: tp.Optional[str] = None,
        timeout: float = 300,
        retry_busy: float = 10,
    ) -> Response:
        """One prediction. The server answers a sync request a moment before it frees its slot, so a
        request sent right after the previous answer can get 409 "At capacity"; like any client, retry
        those for up to ``retry_busy`` seconds (0: return the 409, for the test of the busy answer)."""
        body: tp.Dict[str, tp.Any] = {"input": inputs}
        if webhook:
            body["webhook"] = webhook
        headers = {"Prefer": "respond-async"} if asynchronous else {}
        if prediction_id:
            method, url = "PUT", f"{self.url}/predictions/{prediction_id}"
        else:
            method, url = "POST", f"{self.url}/predictions"
        deadline = time.monotonic() + retry_busy
        while True:
            response = request(method, url, body, headers, timeout)
            if response.status != 409 or time.monotonic() >= deadline:
                return response
            time.sleep(0.05)

    def train(
        self,
        inputs: dict,
        training_id: tp.Optional[str] = None,
        asynchronous: bool = False,
        webhook: tp.Optional[str] = None,
        timeout: float = 600,
    ) -> Response:
        """One training (POST /trainings, or PUT /trainings/<id>)."""
        body: tp.Dict[str, tp.Any] = {"input": inputs}
        if webhook:
            body["webhook"] = webhook
        headers = {"Prefer": "respond-async"} if asynchronous else {}
        if training_id:
            return request("PUT", f"{self.url}/trainings/{training_id}", body, headers, timeout)
        return request("POST", f"{self.url}/trainings", body, headers, timeout)

    def cancel(self, prediction_id: str, kind: str = "predictions") -> Response:
        return request("POST", f"{self.url}/{kind}/{prediction_id}/cancel", timeout=10)

    def worker_pids(self) -> tp.List[int]:
        """The server's child processes (its session, minus the server itself)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, session = int(stat.parent.name), int(fields[3])  # fields after "(comm)": state ppid pgrp session
            if session == self.proc.pid and pid != self.proc.pid:
                pids.append(pid)
        return pids

    def rss_mb(self) -> float:
        """Resident memory of the server's worker process(es), in MB."""
        total = 0
        for pid in self.worker_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
