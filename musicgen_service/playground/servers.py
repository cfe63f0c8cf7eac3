"""The Cog servers the playground talks to: ones it is given by URL (``--server``: script/serve, a
Docker container, anything speaking Cog's HTTP API), or local ones it starts itself with
``script/serve`` on a weights folder, each on the first request that needs it (four models each hold
their own copy of the weights, so only the ones used are loaded).

What a server is (a main, streaming, loop or training model) is read from its own OpenAPI schema, so
the page never holds a copy of any model's inputs.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

KINDS = ("predict", "stream", "loop", "train")
TITLES = {"predict": "Generate", "stream": "Stream", "loop": "Loops", "train": "Train"}
SERVE_FLAGS = {"predict": [], "stream": ["--stream"], "loop": ["--loop"], "train": ["--train"]}


def kind_of(schema: tp.Mapping[str, tp.Any]) -> str:
    """Which of this project's prediction models a server's OpenAPI schema describes. (A training
    server has the main model's schema, trainings included: it is named as one, ``train=URL``.)"""
    schemas = schema.get("components", {}).get("schemas", {})
    output = schemas.get("Output", {})
    if output.get("x-cog-array-type") == "iterator":
        return "stream"
    if "bpm" in schemas.get("Input", {}).get("properties", {}):
        return "loop"
    return "predict"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Call:
    """One answer of a server: status, JSON body (or None) and raw text."""

    status: int
    body: tp.Any
    text: str


def call(
    method: str, url: str, body: tp.Any = None, headers: tp.Optional[tp.Mapping[str, str]] = None, timeout: float = 30.0
) -> Call:
    """One HTTP request to a Cog server; an HTTP error is an answer, not an exception (the 422 of a
    bad input carries the message the page shows)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    return Call(status, parsed, text)


@dataclass
class Server:
    """A Cog server the page can use. ``managed``: started by the playground (``start`` brings it up
    on first use); otherwise ``url`` is a server someone else runs."""

    name: str
    kind: str
    url: str
    managed: bool = False
    env: tp.Dict[str, str] = field(default_factory=dict)
    log_path: tp.Optional[Path] = None
    note: str = ""  # what the page says about it (e.g. "serves the training job's result")
    process: tp.Optional[subprocess.Popen] = None
    schema: tp.Optional[dict] = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "title": TITLES[self.kind],
            "url": self.url,
            "managed": self.managed,
            "started": self.started,
            "note": self.note,
        }

    @property
    def started(self) -> bool:
        return not self.managed or self.process is not None

    def start(self) -> None:
        """Start a managed server (``script/serve`` of its kind) unless it runs; no-op for others."""
        with self.lock:
            if not self.managed or (self.process is not None and self.process.poll() is None):
                return
            assert self.log_path is not None
            port = int(self.url.rsplit(":", 1)[1])
            args = [str(PROJECT_ROOT / "script" / "serve"), "--port", str(port), *SERVE_FLAGS[self.kind]]
            log = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                args,
                cwd=PROJECT_ROOT,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()

    def exited(self) -> tp.Optional[str]:
        """For a managed server that has exited: the end of its log; None while it runs."""
        if not self.managed or self.process is None or self.process.poll() is None:
            return None
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
        return f"the local server exited (code {self.process.returncode}): {tail}"

    def health(self) -> dict:
        if not self.started:
            return {"status": "NOT_STARTED"}
        gone = self.exited()
        if gone:
            return {"status": "EXITED", "error": gone}
        try:
            answer = call("GET", f"{self.url}/health-check", timeout=5)
        except OSError:
            return {"status": "STARTING" if self.managed else "UNREACHABLE"}
        return answer.body if isinstance(answer.body, dict) else {"status": "UNREACHABLE"}

    def openapi(self, wait: float = 60.0) -> dict:
        """The server's OpenAPI schema (read once): a managed server is started and waited for."""
        if self.schema is not None:
            return self.schema
        self.start()
        deadline = time.monotonic() + wait
        while True:
            try:
                answer = call("GET", f"{self.url}/openapi.json", timeout=5)
                if answer.status == 200 and isinstance(answer.body, dict):
                    self.schema = answer.body
                    return self.schema
            except OSError:
                pass
            gone = self.exited()
            if gone or time.monotonic() > deadline:
                raise OSError(gone or f"no OpenAPI schema from {self.url} after {wait:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


class Servers:
    """The servers by name, in the order the page shows them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: tp.Dict[str, Server] = {}
        self.lock = threading.Lock()

    def add_url(self, spec: str) -> Server:
        """A server someone else runs, ``[KIND=]URL``: its kind read from its schema unless given (it
        must answer now)."""
        given, _, url = spec.partition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
        if given and given not in KINDS:
            raise OSError(f"{given!r} is not one of {', '.join(KINDS)}")
        url = url.rstrip("/")
        probe = Server(name="", kind="predict", url=url)
        schema = probe.openapi(wait=10)
        kind = given or kind_of(schema)
        server = Server(name=self._name(kind), kind=kind, url=url, schema=probe.schema)
        with self.lock:
            self.by_name[server.name] = server
        return server

    def add_managed(self, kind: str, env: tp.Mapping[str, str], note: str = "", name: str = "") -> Server:
        """A local ``script/serve`` of ``kind``, started on first use (``Server.start``)."""
        name = name or self._name(kind)
        server = Server(
            name=name,
            kind=kind,
            url=f"http://127.0.0.1:{free_port()}",
            managed=True,
            env=dict(env),
            log_path=self.folder / f"server-{name}.log",
            note=note,
        )
        with self.lock:
            self.by_name[name] = server
        return server

    def _name(self, kind: str) -> str:
        base = "main" if kind == "predict" else kind
        name, n = base, 1
        while name in self.by_name:
            n += 1
            name = f"{base}-{n}"
        return name

    def get(self, name: str) -> tp.Optional[Server]:
        with self.lock:
            return self.by_name.get(name)

    def all(self) -> tp.List[Server]:
        with self.lock:
            return list(self.by_name.values())

    def stop(self) -> None:
        for server in self.all():
            server.stop()
