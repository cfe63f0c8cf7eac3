"""The playground's predictions and trainings ("jobs"): each one's inputs, status, logs and outputs as
its server's webhooks report them, relayed to the pages watching it, and kept as the history.

A Cog server without ``--upload-url`` returns files as ``data:`` URIs, and a streaming prediction's
every webhook carries the whole list so far: each URI is written to the job's folder once, the first
time it arrives, and the page gets short ``/files/...`` URLs. Inputs given as ``data:`` URIs (an
uploaded melody, a recording, a dataset) are kept the same way, so a history entry can be sent again.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import queue
import re
import secrets
import threading
import time
import typing as tp
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

TERMINAL = ("succeeded", "failed", "canceled")
MAX_LOG_CHARS = 200_000  # what a history entry keeps of a job's logs
HISTORY_FILE = "history.json"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
EXTENSIONS = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "application/json": ".json",
    "text/plain": ".txt",
}


@dataclass
class Job:
    id: str
    server: str  # the playground's name for the server (main, stream, loop, train, trained-...)
    kind: str  # the server's kind (servers.KINDS)
    endpoint: str  # "predictions" or "trainings"
    input: tp.Dict[str, tp.Any]  # as the page sent it, files replaced by their /files/ URLs
    created: float = field(default_factory=time.time)
    status: str = "starting"
    logs: str = ""
    output: tp.Any = None
    error: tp.Optional[str] = None
    seed: tp.Optional[int] = None  # from the logs ("seed: N")
    submitted_at: tp.Optional[float] = None  # when the playground sent it (epoch s, this machine's clock)
    first_output_at: tp.Optional[float] = None  # when a webhook first carried an output
    completed_at: tp.Optional[float] = None
    heard_at: tp.Optional[float] = None  # when the page reported the first audio playing
    localized: tp.Dict[str, str] = field(default_factory=dict)  # output key -> /files/ URL

    def view(self) -> dict:
        """What the page gets (no bookkeeping)."""
        out = asdict(self)
        out.pop("localized")
        return out


class Jobs:
    """Every job of this playground, newest last; its files under ``folder/<job id>/``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = threading.Lock()
        self.jobs: tp.Dict[str, Job] = {}
        self.watchers: tp.Dict[str, tp.List[queue.Queue]] = {}
        self._load()

    # -- the history on disk ------------------------------------------------------------------

    def _load(self) -> None:
        path = self.folder / HISTORY_FILE
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        for entry in entries if isinstance(entries, list) else []:
            try:
                job = Job(**entry)
            except TypeError:
                continue
            if job.status not in TERMINAL:  # the server that ran it is gone with the last playground
                job.status, job.error = "failed", job.error or "the playground stopped before it ended"
            self.jobs[job.id] = job

    def _save(self) -> None:
        entries = [asdict(j) for j in self.jobs.values() if j.status in TERMINAL]
        tmp = self.folder / (HISTORY_FILE + ".tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(self.folder / HISTORY_FILE)

    # -- jobs ----------------------------------------------------------------------------------

    def create(self, server: str, kind: str, inputs: tp.Mapping[str, tp.Any]) -> tp.Tuple[Job, dict]:
        """A new job: returns it and the inputs to send (the page's, untouched); the job keeps its
        files as /files/ URLs."""
        job_id = secrets.token_hex(16)
        (self.folder / job_id).mkdir(parents=True)
        kept: tp.Dict[str, tp.Any] = {}
        for name, value in inputs.items():
            if isinstance(value, str) and value.startswith("data:") and FILE_NAME.match(name):
                kept[name] = self._write_data_uri(job_id, f"input-{name}", value) or value
            else:
                kept[name] = value
        job = Job(
            id=job_id, server=server, kind=kind, endpoint="trainings" if kind == "train" else "predictions", input=kept
        )
        with self.lock:
            self.jobs[job_id] = job
        return job, dict(inputs)

    def get(self, job_id: str) -> tp.Optional[Job]:
        with self.lock:
            return self.jobs.get(job_id)

    def history(self) -> tp.List[dict]:
        with self.lock:
            return [j.view() for j in sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)]

    def fail(self, job_id: str, error: str) -> None:
        """The server refused the job (or could not be reached): it ends here."""
        self.update(job_id, {"status": "failed", "error": error})

    def update(self, job_id: str, payload: tp.Mapping[str, tp.Any]) -> bool:
        """A webhook's payload (Cog's prediction object) applied to its job; watchers told."""
        job = self.get(job_id)
        if job is None:
            return False
        output = self._localize(job, payload.get("output"), "output")  # outside the lock: writes files
        with self.lock:
            if job.status in TERMINAL:  # a late or repeated webhook changes nothing
                return True
            status = payload.get("status")
            if isinstance(status, str):
                job.status = status
            logs = payload.get("logs")
            if isinstance(logs, str):
                job.logs = logs[-MAX_LOG_CHARS:]
                seeds = re.findall(r"^seed: (\d+)", job.logs, re.M)
                job.seed = int(seeds[0]) if seeds else job.seed
            if output is not None:
                if job.first_output_at is None:
                    job.first_output_at = time.time()
                job.output = output
            error = payload.get("error")
            if error:
                job.error = str(error)
            if job.status in TERMINAL:
                job.completed_at = time.time()
                self._save()
            view = job.view()
            watchers = list(self.watchers.get(job_id, []))
        for q in watchers:
            q.put(view)
        return True

    def heard(self, job_id: str, at: float) -> None:
        job = self.get(job_id)
        if job is not None and job.heard_at is None:
            with self.lock:
                job.heard_at = at
            self.update(job_id, {})

    # -- watching ------------------------------------------------------------------------------

    def watch(self, job_id: str) -> "queue.Queue[dict]":
        q: "queue.Queue[dict]" = queue.Queue()
        with self.lock:
            self.watchers.setdefault(job_id, []).append(q)
            job = self.jobs.get(job_id)
            if job is not None:
                q.put(job.view())
        return q

    def unwatch(self, job_id: str, q: "queue.Queue[dict]") -> None:
        with self.lock:
            if q in self.watchers.get(job_id, []):
                self.watchers[job_id].remove(q)

    # -- files ---------------------------------------------------------------------------------

    def file(self, job_id: str, name: str) -> tp.Optional[Path]:
        """A job's file by its URL's parts, or None: names are checked, never joined blindly."""
        if not JOB_ID.match(job_id) or not FILE_NAME.match(name) or name.startswith("."):
            return None
        path = self.folder / job_id / name
        return path if path.is_file() else None

    def path_of(self, url: str) -> tp.Optional[Path]:
        """The local file behind one of this playground's /files/ URLs."""
        parts = urllib.parse.urlparse(url).path.split("/")
        return self.file(parts[2], parts[3]) if len(parts) == 4 and parts[1] == "files" else None

    def _localize(self, job: Job, value: tp.Any, key: str) -> tp.Any:
        """``value`` with every data: URI written to the job's folder (once per key) and replaced by
        its URL; other values as they are."""
        if isinstance(value, str):
            if not value.startswith("data:"):
                return value
            if key not in job.localized:
                url = self._write_data_uri(job.id, key, value)
                if url is None:
                    return None
                job.localized[key] = url
            return job.localized[key]
        if isinstance(value, list):
            return [self._localize(job, v, f"{key}-{i:04d}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {
                k: self._localize(job, v, f"{key}-{k}" if FILE_NAME.match(str(k)) else key) for k, v in value.items()
            }
        return value

    def _write_data_uri(self, job_id: str, stem: str, uri: str) -> tp.Optional[str]:
        head, _, data = uri.partition(",")
        mime = head[5:].split(";")[0].strip().lower()
        try:
            raw = base64.b64decode(data, validate=False) if ";base64" in head else urllib.parse.unquote_to_bytes(data)
        except (binascii.Error, ValueError):
            return None
        ext = EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ""
        if ext in ("", ".bin") and raw[8:9] == b"{":  # safetensors: an 8-byte length, then its JSON header
            ext = ".safetensors"
        name = f"{stem}{ext or '.bin'}"
        (self.folder / job_id / name).write_bytes(raw)
        return f"/files/{job_id}/{name}"
