"""``script/playground``: the page, and the relay between it and the Cog servers.

The browser talks only to this process (one origin; Cog sends no CORS headers). A job is sent to its
server as an async prediction (``PUT /predictions/<id>``, ``Prefer: respond-async``) whose webhooks come
back here (``/hooks/<id>``) and go on to the page as server-sent events, so every model, the streaming
one included, reports progress, logs and each output the moment the server sends it. A server's answer
to a bad input (422 with Cog's ``detail``, or a failed prediction whose error names the field) goes to
the page unchanged.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing as tp
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .jobs import TERMINAL, Jobs
from .servers import KINDS, PROJECT_ROOT, Server, Servers, call

PAGE = Path(__file__).resolve().parent / "page"
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
MAX_REQUEST_BYTES = 1024**3  # a dataset archive or a trained file, as a data: URI in JSON
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]


class Playground:
    """What the handler works on: the servers, the jobs, and the URL the servers call back on."""

    def __init__(self, servers: Servers, jobs: Jobs, callback_url: str, tiny: bool):
        self.servers = servers
        self.jobs = jobs
        self.callback_url = callback_url.rstrip("/")
        self.tiny = tiny
        self.trained_env: tp.Dict[str, str] = {}  # the environment a served training result starts with

    def submit(self, server: Server, inputs: tp.Mapping[str, tp.Any]) -> tp.Tuple[int, dict]:
        """Send a job to ``server``; the HTTP status and body for the page."""
        job, sent = self.jobs.create(server.name, server.kind, inputs)
        body = {
            "id": job.id,
            "input": sent,
            "webhook": f"{self.callback_url}/hooks/{job.id}",
            "webhook_events_filter": WEBHOOK_EVENTS,
        }
        job.submitted_at = time.time()
        try:
            answer = call("PUT", f"{server.url}/{job.endpoint}/{job.id}", body, {"Prefer": "respond-async"}, 60)
        except OSError as exc:
            self.jobs.fail(job.id, f"cannot reach the server {server.url}: {exc}")
            return 502, {"error": f"cannot reach the server {server.url}: {exc}", "job": job.view()}
        if answer.status in (200, 201, 202):
            return 202, {"job": job.view()}
        detail = answer.body.get("detail") if isinstance(answer.body, dict) else None
        message = answer.text if detail is None else json.dumps(detail)
        self.jobs.fail(job.id, f"HTTP {answer.status}: {message[:2000]}")
        return answer.status, {"detail": detail, "error": message[:2000], "job": job.view()}

    def serve_trained(self, job_id: str) -> tp.Tuple[int, dict]:
        """Start a main-model server on a training job's trained file (Cog's ``COG_WEIGHTS``)."""
        job = self.jobs.get(job_id)
        weights = job.output.get("weights") if job and isinstance(job.output, dict) else None
        path = self.jobs.path_of(weights) if isinstance(weights, str) else None
        if job is None or job.status != "succeeded" or path is None:
            return 400, {"error": "only a succeeded training's trained file can be served"}
        main = next((s for s in self.servers.all() if s.kind == "predict" and s.managed), None)
        if main is None:
            return 400, {
                "error": "the playground serves a trained file on a local server it starts; "
                "it was given servers by URL: run script/serve with COG_WEIGHTS=<file>"
            }
        server = self.servers.add_managed(
            "predict",
            {**main.env, "COG_WEIGHTS": str(path)},
            note=f"the trained file of training {job_id[:8]}",
            name=f"trained-{job_id[:8]}",
        )
        server.start()
        return 200, {"server": server.describe()}


def why_no_schema(server: Server, exc: OSError) -> str:
    """What the page says when a server gives no schema: its failed setup's last lines, if that is why."""
    health = server.health()
    setup = health.get("setup")
    if health.get("status") == "SETUP_FAILED" and isinstance(setup, dict):
        return "setup failed: " + str(setup.get("logs", ""))[-1500:]
    return str(health.get("error") or exc)


def handler(pg: Playground) -> tp.Type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: tp.Any) -> None:  # the page polls: keep the terminal quiet
            pass

        # -- answers -------------------------------------------------------------------------

        def send_json(self, status: int, body: tp.Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(raw)

        def send_file(self, path: Path, content_type: str) -> None:
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "none")
            self.end_headers()
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile)

        def read_json(self) -> tp.Any:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BYTES:
                raise ValueError(f"the request is {length} bytes, more than the playground takes")
            raw = self.rfile.read(length) if length else b"{}"
            return json.loads(raw)

        # -- routes --------------------------------------------------------------------------

        def do_GET(self) -> None:
            parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
            if parts == [""] or parts == ["index.html"]:
                return self.send_file(PAGE / "index.html", PAGE_FILES["index.html"])
            if len(parts) == 2 and parts[0] == "page" and parts[1] in PAGE_FILES:
                return self.send_file(PAGE / parts[1], PAGE_FILES[parts[1]])
            if len(parts) == 3 and parts[0] == "files":
                path = pg.jobs.file(parts[1], parts[2])
                if path is None:
                    return self.send_json(404, {"error": "no such file"})
                ext = path.suffix.lower()
                kind = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".json": "application/json"}.get(
                    ext, "application/octet-stream"
                )
                return self.send_file(path, kind)
            if parts == ["api", "servers"]:
                return self.send_json(200, {"servers": [s.describe() for s in pg.servers.all()], "tiny": pg.tiny})
            if len(parts) == 4 and parts[:2] == ["api", "servers"]:
                server = pg.servers.get(parts[2])
                if server is None:
                    return self.send_json(404, {"error": f"no server {parts[2]}"})
                if parts[3] == "schema":
                    try:
                        return self.send_json(200, server.openapi())
                    except OSError as exc:
                        return self.send_json(502, {"error": why_no_schema(server, exc)})
                if parts[3] == "health":
                    return self.send_json(200, server.health())
            if parts == ["api", "history"]:
                return self.send_json(200, {"jobs": pg.jobs.history()})
            if len(parts) == 3 and parts[:2] == ["api", "jobs"]:
                job = pg.jobs.get(parts[2])
                return self.send_json(200, job.view()) if job else self.send_json(404, {"error": "no such job"})
            if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "events":
                return self.events(parts[2])
            self.send_json(404, {"error": "not found"})

        def events(self, job_id: str) -> None:
            """The job's updates as server-sent events, until it ends or the page goes."""
            if pg.jobs.get(job_id) is None:
                return self.send_json(404, {"error": "no such job"})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            q = pg.jobs.watch(job_id)
            try:
                while True:
                    try:
                        view = q.get(timeout=15)
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                        continue
                    self.wfile.write(b"event: job\ndata: " + json.dumps(view).encode() + b"\n\n")
                    self.wfile.flush()
                    if view["status"] in TERMINAL and q.empty():
                        break
            except OSError:  # the page went away
                pass
            finally:
                pg.jobs.unwatch(job_id, q)

        def do_POST(self) -> None:
            parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
            try:
                body = self.read_json()
            except ValueError as exc:
                return self.send_json(400, {"error": f"not JSON the playground takes: {exc}"})
            if len(parts) == 2 and parts[0] == "hooks":
                known = isinstance(body, dict) and pg.jobs.update(parts[1], body)
                return self.send_json(200 if known else 404, {})
            if len(parts) == 4 and parts[:2] == ["api", "servers"] and parts[3] == "jobs":
                server = pg.servers.get(parts[2])
                if server is None:
                    return self.send_json(404, {"error": f"no server {parts[2]}"})
                if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
                    return self.send_json(400, {"error": 'the body must be {"input": {...}}'})
                status, answer = pg.submit(server, body["input"])
                return self.send_json(status, answer)
            if len(parts) == 4 and parts[:2] == ["api", "servers"] and parts[3] == "start":
                server = pg.servers.get(parts[2])
                if server is None:
                    return self.send_json(404, {"error": f"no server {parts[2]}"})
                server.start()
                return self.send_json(200, server.describe())
            if len(parts) == 4 and parts[:2] == ["api", "jobs"]:
                job = pg.jobs.get(parts[2])
                if job is None:
                    return self.send_json(404, {"error": "no such job"})
                if parts[3] == "cancel":
                    server = pg.servers.get(job.server)
                    if server is None:
                        return self.send_json(404, {"error": "its server is gone"})
                    try:
                        cancelled = call("POST", f"{server.url}/{job.endpoint}/{job.id}/cancel", timeout=10)
                    except OSError as exc:
                        return self.send_json(502, {"error": str(exc)})
                    return self.send_json(cancelled.status, cancelled.body or {})
                if parts[3] == "heard" and isinstance(body, dict) and isinstance(body.get("at"), (int, float)):
                    pg.jobs.heard(job.id, float(body["at"]))
                    return self.send_json(200, {})
                if parts[3] == "serve":
                    status, answer = pg.serve_trained(job.id)
                    return self.send_json(status, answer)
            self.send_json(404, {"error": "not found"})

    return Handler


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/playground",
        description="A web page for the model: generate, stream, loop and train, through the Cog HTTP API.",
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[KIND=]URL",
        help="a running Cog server of this model (script/serve, docker run ...); repeat for "
        "several. Its kind (predict, stream, loop) is read from its schema; a training "
        "server is given as train=URL. None: local servers are started",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="where the page listens (default: loopback only)")
    parser.add_argument(
        "--callback-url",
        help="the URL the servers reach this playground at for webhooks "
        "(default http://127.0.0.1:PORT; a container: run it with "
        "--network host, or give http://host.docker.internal:PORT)",
    )
    parser.add_argument(
        "--folder", type=Path, help="where results and the history are kept (default ~/.cache/musicgen/playground)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="start the local servers on the tests' tiny random models (noise, but the real code), built once",
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help="the local servers offered (default: all)")
    args = parser.parse_args(argv)

    from ..core.settings import Settings

    settings = Settings.from_env()
    folder = args.folder or (settings.cache_home or Path.home() / ".cache") / "musicgen" / "playground"
    folder.mkdir(parents=True, exist_ok=True)
    servers = Servers(folder)
    tiny = False
    if args.server:
        for url in args.server:
            try:
                servers.add_url(url)
            except OSError as exc:
                print(f"playground: {url} does not answer as a Cog server: {exc}", file=sys.stderr)
                return 1
    else:
        weights, tiny = local_weights(settings, args.tiny, folder)
        env = {"MUSICGEN_WEIGHTS": str(weights)}
        for kind in args.kinds.split(","):
            if kind not in KINDS:
                print(f"playground: --kinds: {kind!r} is not one of {', '.join(KINDS)}", file=sys.stderr)
                return 2
            servers.add_managed(kind, env, note="tiny random models: noise" if tiny else "")
        first = servers.all()[0]
        first.start()  # the first tab's server loads while the page opens
    jobs = Jobs(folder)
    pg = Playground(servers, jobs, args.callback_url or f"http://127.0.0.1:{args.port}", tiny)
    httpd = ThreadingHTTPServer((args.host, args.port), handler(pg))
    httpd.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown).start())
    print(f"playground: http://{args.host}:{httpd.server_address[1]}/ (results in {folder})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        servers.stop()
        httpd.server_close()
    return 0


def local_weights(settings: tp.Any, want_tiny: bool, folder: Path) -> tp.Tuple[Path, bool]:
    """The weights folder the local servers start on: the configured one when it holds the model,
    else (or with --tiny) the tests' tiny set, built once into the playground's folder."""
    from ..core.errors import WeightsMissingError
    from ..weights.hub import musicgen_folder

    if not want_tiny:
        try:
            musicgen_folder(settings.weights_dir, settings.model)
            return settings.weights_dir, False
        except WeightsMissingError:
            print(
                f"playground: {settings.model} is not in {settings.weights_dir} (script/download-weights "
                "fetches it): using the tiny random models",
                file=sys.stderr,
            )
    tiny = folder / "tiny-weights"
    if not (tiny / ".complete").exists():
        import subprocess

        staging = Path(tempfile.mkdtemp(dir=folder, prefix="tiny-"))
        subprocess.run(
            [str(PROJECT_ROOT / "script" / "tiny-weights"), str(staging)], check=True, stdout=subprocess.DEVNULL
        )
        (staging / ".complete").write_text("")
        shutil.rmtree(tiny, ignore_errors=True)
        staging.replace(tiny)
    return tiny, True


if __name__ == "__main__":
    sys.exit(main())
