"""Where a trained file comes from: ``setup(weights=...)`` (Cog passes ``COG_WEIGHTS``, a path or a URL,
to a trained version) or ``MUSICGEN_TRAINED`` (a file, or a folder holding one).

A URL is downloaded into the trained-files folder under the sha256 of its content, never under its
name: two trained versions with the same file name are two files. The URL's ``ETag``, when the server
gives one, lets a later setup ask ``If-None-Match`` and reuse the stored file on ``304``; any other
answer is downloaded again and stored by its own hash. Downloads are bounded (size, an overall deadline,
reads that take what one network read brings), never follow a redirect from https down to http, and
never log or store a URL's query (signed URLs carry credentials there): the index is keyed by the URL's
hash. Stored files are kept under :data:`MAX_STORED_BYTES`, the least recently used removed first, and
temporaries of killed processes are removed at the next download.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

from ..core import disk
from ..core.errors import TrainedError
from ..core.logs import get_logger
from .trained import SUFFIX

log = get_logger()


def resolve(source: tp.Union[str, Path], cache_dir: Path) -> Path:
    """The local trained file for ``source``: a file, a folder holding exactly one ``*.safetensors``,
    or an http(s) URL (downloaded into ``cache_dir`` by content)."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        return _download(text, Path(cache_dir))
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(path.glob(f"*{SUFFIX}"))
        if len(found) != 1:
            raise TrainedError(f"the trained weights folder {path} holds {len(found)} {SUFFIX} files; "
                               "it must hold exactly one")
        path = found[0]
    if not path.is_file():
        raise TrainedError(f"trained weights {path}: no such file")
    return path


# Downloads (a trained version's COG_WEIGHTS URL, e.g. a signed storage URL):
MAX_DOWNLOAD_BYTES = 10 * 1024**3  # above the largest full fine-tune (the 3.3B LM in fp16: ~6.6 GB)
DOWNLOAD_SECONDS = 1800.0  # the whole download; a server that trickles bytes is given up on
READ_TIMEOUT_SECONDS = 60.0  # one read
MAX_STORED_BYTES = 24 * 1024**3  # downloaded files kept for later setups, least recently used out first


def redacted(url: str) -> str:
    """``url`` without what may be secret: the query (signed URLs carry credentials there), the
    fragment and a user:password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + ("?..." if parts.query else "")


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, and never from https down to http (the file would cross the network
    in the clear, and a man in the middle could replace it)."""

    def redirect_request(self, req: tp.Any, fp: tp.Any, code: int, msg: str, headers: tp.Any, newurl: str) -> tp.Any:
        from urllib.parse import urlsplit

        old, new = urlsplit(req.full_url).scheme, urlsplit(newurl).scheme
        if new not in ("http", "https"):
            raise TrainedError(f"trained weights: {redacted(req.full_url)} redirects to a {new or 'relative'} URL: refused")
        if old == "https" and new == "http":
            raise TrainedError(f"trained weights: {redacted(req.full_url)} redirects from https to http "
                               f"({redacted(newurl)}): refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, cache_dir: Path) -> Path:
    from ..core import disk

    cache_dir.mkdir(parents=True, exist_ok=True)
    disk.remove_leftovers(cache_dir, r"\.(?:download|urls)-(?P<pid>\d+)[-.].*")
    shown = redacted(url)
    index_path = cache_dir / "urls.json"
    try:
        index = json.loads(index_path.read_text())
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}
    key = hashlib.sha256(url.encode()).hexdigest()  # the index never holds a URL (nor its signature)
    known = index.get(key) if isinstance(index.get(key), dict) else None
    headers = {}
    if known and known.get("etag") and (cache_dir / str(known.get("file"))).is_file():
        headers["If-None-Match"] = known["etag"]
    opener = urllib.request.build_opener(_Redirects)
    start = time.perf_counter()
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=READ_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 304 and known:
            log.info("trained weights: %s unchanged (ETag), using the stored %s", shown, known["file"])
            stored = cache_dir / known["file"]
            os.utime(stored)  # (its last use, for the eviction of the least recently used)
            return stored
        raise TrainedError(f"trained weights: {shown} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TrainedError(f"trained weights: cannot download {shown}: {getattr(exc, 'reason', exc)}") from None
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > MAX_DOWNLOAD_BYTES:
        response.close()
        raise TrainedError(f"trained weights: {shown} is {int(declared) / 1e9:.1f} GB; the limit is "
                           f"{MAX_DOWNLOAD_BYTES / 1e9:.1f} GB (more than the largest full fine-tune)")
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".download-{os.getpid()}-")
    received = 0
    try:
        with response, os.fdopen(fd, "wb") as out:
            while True:
                block = response.read1(1 << 20)  # whatever one read brings: a trickle cannot hold a read open
                if not block:
                    break
                received += len(block)
                if received > MAX_DOWNLOAD_BYTES:
                    raise TrainedError(f"trained weights: {shown} is larger than {MAX_DOWNLOAD_BYTES / 1e9:.1f} GB, "
                                       "the limit (more than the largest full fine-tune)")
                if time.perf_counter() - start > DOWNLOAD_SECONDS:
                    raise TrainedError(f"trained weights: downloading {shown} took longer than "
                                       f"{DOWNLOAD_SECONDS:.0f} s ({received / 1e6:.1f} MB received): given up")
                h.update(block)
                out.write(block)
            etag = response.headers.get("ETag")
        name = f"{h.hexdigest()}{SUFFIX}"
        os.replace(tmp_name, cache_dir / name)
    except (OSError, urllib.error.URLError) as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise TrainedError(f"trained weights: downloading {shown} failed after {received / 1e6:.1f} MB: "
                           f"{getattr(exc, 'reason', None) or exc}") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    index = {k: v for k, v in index.items() if len(k) == 64 and isinstance(v, dict)}  # (older indexes held URLs)
    index[key] = {"file": name, "etag": etag}
    tmp_index = index_path.with_name(f".urls-{os.getpid()}.json")
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, index_path)
    log.info("trained weights: downloaded %s (%.1f MB) in %.2f s, stored as %s", shown,
             (cache_dir / name).stat().st_size / 1e6, time.perf_counter() - start, name)
    stored = [disk.Entry(p, p.stat().st_size, p.stat().st_mtime) for p in cache_dir.glob(f"*{SUFFIX}")]
    disk.evict_least_recent(stored, MAX_STORED_BYTES, keep=[cache_dir / name])
    return cache_dir / name
