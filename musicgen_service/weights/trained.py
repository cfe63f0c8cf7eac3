"""A trained file: what it holds, where it comes from, and how it becomes the served model.

**What it holds.** One safetensors file (``*.safetensors``) that a user can store and pass around:

- ``method: lora``: for each adapted matrix ``<parameter>``, ``<parameter>.lora_A`` [rank, in] and
  ``<parameter>.lora_B`` [out, rank] in fp16; the update is ``scale * B @ A`` (see
  :mod:`.training.adapters`), with ``scale = alpha / rank``;
- ``method: full``: every LM parameter (the ``best_state`` of an audiocraft checkpoint) in fp16;

and, in the file's metadata (the safetensors header's string map), ``musicgen_manifest``: JSON with
``format`` (:data:`FORMAT`), ``base_model`` and ``base_checkpoint`` (the identity of the base's LM
checkpoint: :func:`.weights.checkpoint_identity`), ``method``, ``rank``, ``alpha``, ``targets``, the
training settings, a dataset summary, the final loss and when it was made.

**Where it comes from** (:func:`resolve`): ``setup(weights=...)`` (Cog passes ``COG_WEIGHTS``, a path
or a URL, to a trained version) or ``MUSICGEN_TRAINED`` (a file, or a folder holding one). A URL is
downloaded into ``<prepared folder>/trained/`` under the sha256 of its content, never under its
name: two trained versions with the same file name are two files. The URL's ``ETag``, when the
server gives one, lets a later setup ask ``If-None-Match`` and reuse the stored file on ``304``; any
other answer is downloaded again and stored by its own hash.

**How it is served** (:func:`apply`): the file must name the served base model (``MUSICGEN_MODEL``)
and that model's checkpoint identity; another base is refused with a message naming both. A LoRA is
merged into the LM's weights before the decoder prepares them (``W += scale * B @ A``, in fp32, then
the parameter's dtype), so every decoder (``exact``, ``auto`` with its int8 formats, CUDA graphs) and
batching serve it unchanged; a full fine-tune replaces the LM's parameters. The prepared-decoder
cache keys its entries by the trained file's identity too.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

from ..core.logs import get_logger

log = get_logger()

FORMAT = "musicgen-cog-trained/1"
METHODS = ("lora", "full")
MANIFEST_KEY = "musicgen_manifest"
SUFFIX = ".safetensors"


class TrainedError(ValueError):
    """A trained file that cannot be served here (the message says why and what to do)."""


# ------------------------------------------------------------------------------------------ writing

def write(path: Path, tensors: tp.Mapping[str, tp.Any], manifest: tp.Mapping[str, tp.Any]) -> Path:
    """Write the trained file atomically (a temporary name, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    manifest = {"format": FORMAT, **manifest}
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={MANIFEST_KEY: json.dumps(manifest)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ reading

class Trained:
    """A trained file, opened: its manifest, and its tensors read (memory-mapped) on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                self.names = list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise TrainedError(f"{self.path} is not a safetensors file ({type(exc).__name__}: {exc})") from None
        try:
            self.manifest = json.loads(meta[MANIFEST_KEY])
        except (KeyError, ValueError):
            raise TrainedError(f"{self.path} has no MusicGen training manifest: it was not written by "
                               "this project's trainer (script/train, cog train)") from None
        if not isinstance(self.manifest, dict):
            raise TrainedError(f"{self.path}: its training manifest is not a JSON object")
        if self.manifest.get("format") != FORMAT:
            raise TrainedError(f"{self.path} is a trained file of format {self.manifest.get('format')!r}; "
                               f"this service reads {FORMAT!r}")
        if not isinstance(self.manifest.get("base_model"), str):
            raise TrainedError(f"{self.path}: its training manifest names no base model")
        if not isinstance(self.manifest.get("base_checkpoint") or {}, dict):
            raise TrainedError(f"{self.path}: its training manifest's base_checkpoint is not an object")

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]

    def tensors(self) -> tp.Dict[str, tp.Any]:
        from safetensors.torch import load_file

        return load_file(str(self.path))

    def identity(self) -> tp.Dict[str, tp.Any]:
        return {"sha256": sha256_of(self.path), "size": self.path.stat().st_size}

    def describe(self) -> str:
        m = self.manifest
        what = f"LoRA rank {m.get('rank')}" if self.method == "lora" else "full fine-tune"
        steps = m["training"].get("steps", "?") if isinstance(m.get("training"), dict) else "?"
        loss = m.get("final_loss")
        loss_text = f"{loss:.3f}" if isinstance(loss, (int, float)) else "?"
        return f"{self.path.name}: {what} of {self.base_model}, {steps} steps, final loss {loss_text}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ where from

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


# ------------------------------------------------------------------------------------------ serving

def check_base(trained: Trained, model: str, checkpoint: tp.Mapping[str, tp.Any]) -> None:
    """Refuse a file trained on another base than the served ``model`` (id and checkpoint)."""
    base, base_ckpt = trained.base_model, trained.manifest.get("base_checkpoint")
    if base != model:
        raise TrainedError(f"{trained.path.name} was trained on {base}, but this service serves {model}: "
                           f"set MUSICGEN_MODEL={base} (with its weights in the weights folder) to serve it")
    if base_ckpt and dict(base_ckpt) != dict(checkpoint):
        raise TrainedError(f"{trained.path.name} was trained on {base} with checkpoint {_short(base_ckpt)}, "
                           f"but the weights folder's {model} is checkpoint {_short(checkpoint)}: another "
                           "release of the model; train again on this one")


def validate(trained: Trained, shapes: tp.Mapping[str, tp.Tuple[int, ...]]) -> None:
    """Check the whole file against the base LM checkpoint's tensor ``shapes`` (name -> shape), before
    anything is applied: the manifest's method, rank and alpha, every tensor present, of a float dtype,
    of the shape its weight needs (a 1-element tensor would broadcast into a whole weight), finite.
    One :class:`TrainedError` naming the file and the first problem."""
    import torch
    from safetensors import safe_open

    name, m = trained.path.name, trained.manifest

    def bad(problem: str) -> tp.NoReturn:
        raise TrainedError(f"{name} cannot be served: {problem}")

    if m.get("method") not in METHODS:
        bad(f"its method is {m.get('method')!r}; a trained file holds one of {', '.join(METHODS)}")
    if m["method"] == "lora":
        rank, alpha = m.get("rank"), m.get("alpha")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            bad(f"its LoRA rank is {rank!r}; it must be a whole number >= 1")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
            bad(f"its LoRA alpha is {alpha!r}; it must be a finite number > 0")
    expected: tp.Dict[str, tp.Tuple[int, ...]] = {}
    if m["method"] == "lora":
        bases = set()
        for tensor in trained.names:
            base, dot, part = tensor.rpartition(".")
            if not dot or part not in ("lora_A", "lora_B"):
                bad(f"it holds {tensor!r}, which is no LoRA tensor (<weight>.lora_A / .lora_B)")
            bases.add(base)
        if not bases:
            bad("it holds no LoRA tensors")
        for base in sorted(bases):
            shape = shapes.get(base)
            if shape is None or len(shape) != 2:
                bad(f"it adapts {base!r}, which is no weight matrix of {trained.base_model}")
            for part, want in (("lora_A", (m["rank"], shape[1])), ("lora_B", (shape[0], m["rank"]))):
                if f"{base}.{part}" not in trained.names:
                    bad(f"{base}.{part} is missing")
                expected[f"{base}.{part}"] = want
    else:
        for tensor in trained.names:
            if tensor not in shapes:
                bad(f"it holds {tensor!r}, which {trained.base_model} does not have")
            expected[tensor] = tuple(shapes[tensor])
    with safe_open(str(trained.path), framework="pt") as f:
        for tensor, want in expected.items():  # one at a time: a full fine-tune is gigabytes
            shape = tuple(f.get_slice(tensor).get_shape())
            if shape != tuple(want):
                bad(f"{tensor} is {list(shape)}; {trained.base_model} needs {list(want)}")
            value = f.get_tensor(tensor)
            if not value.is_floating_point():
                bad(f"{tensor} holds {value.dtype} values; weights are floating point")
            if not bool(torch.isfinite(value).all()):
                bad(f"{tensor} holds NaN or infinite values")


def _short(identity: tp.Mapping[str, tp.Any]) -> str:
    value = identity.get("sha256") or identity.get("sampled_sha256") or "?"
    return f"{value[:12]} ({identity.get('size', '?')} bytes)"


def apply(trained: Trained, lm: tp.Any) -> None:
    """Put the trained weights into ``lm`` (before any decoder prepares it)."""
    import torch

    start = time.perf_counter()
    tensors = trained.tensors()
    params = dict(lm.named_parameters())
    with torch.no_grad():
        if trained.method == "full":
            missing = sorted(set(params) - set(tensors))
            unexpected = sorted(set(tensors) - set(params))
            if missing or unexpected:
                raise TrainedError(f"{trained.path.name} does not fit this LM: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
            for name, p in params.items():
                if p.numel():  # (empty: a prepared decoder holds it, made from these weights)
                    p.copy_(tensors[name].to(p.dtype))
        elif trained.method == "lora":
            merge_lora(lm, tensors, trained.manifest)
        else:
            raise TrainedError(f"{trained.path.name}: unknown method {trained.method!r}")
    log.info("trained weights: %s applied in %.2f s", trained.describe(), time.perf_counter() - start)


def merge_lora(lm: tp.Any, tensors: tp.Mapping[str, tp.Any], manifest: tp.Mapping[str, tp.Any]) -> int:
    """``W += scale * B @ A`` for every adapted weight, in fp32 then the weight's dtype. Weights left
    empty (a prepared decoder holds them, made from these very weights) are skipped. Returns the
    number merged."""
    scale = float(manifest["alpha"]) / int(manifest["rank"])
    names = sorted(n[: -len(".lora_A")] for n in tensors if n.endswith(".lora_A"))
    merged = 0
    for name in names:
        try:
            weight = lm.get_parameter(name)
        except AttributeError:
            raise TrainedError(f"the trained file adapts {name}, which this LM does not have") from None
        if weight.numel() == 0:
            continue
        a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise TrainedError(f"the trained file's {name} is {b.shape[0]}x{a.shape[1]}, the LM's "
                               f"{tuple(weight.shape)}")
        update = (b.to(weight.device) @ a.to(weight.device)) * scale
        weight.data.copy_((weight.data.float() + update).to(weight.dtype))
        merged += 1
    return merged
