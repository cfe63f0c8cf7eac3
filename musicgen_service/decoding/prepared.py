"""Prepared decoders on disk: ``auto``'s decision and the chosen format's weights, kept between boots.

On a CPU, setup with ``auto`` measures every weight format on this machine and converts the whole
LM into the one it picks (:mod:`.precision`); a named format (``int8``...) converts too. Both cost
seconds that grow with the LM (musicgen-small on a 2-core Xeon: measuring 3.0 s, int8dyn conversion
6.3 s), on every boot. The result only depends on the checkpoint, the machine and a few settings,
so it is written once and read back by later setups:

- **key** (:func:`key`): what makes an entry valid: the LM checkpoint's identity (its content hash
  where the hub cache gives one, else its size and a hash of samples spread over it: see
  :func:`..weights.hub.checkpoint_identity`), the decoder asked for and the rows a step decodes at full
  load (``2 x concurrency``), the CPU (model name and the hash of its flags), torch's version and
  thread count, and this module's :data:`FORMAT` plus ``auto``'s rules (candidates, quality bar).
  The folder of an entry is the hash of its key, and the key is stored inside it too.
- **entry**: ``manifest.json`` (the key, the decision, the measurement table, the weights file's
  size and sha256) and ``matrices.pt`` (each matrix's stored tensors, by the runner's names, saved
  by ``torch.save``: read back memory-mapped, so the pages are the page cache's). An entry for
  ``exact`` holds no weights: the LM's parameters are its weights.
- **reading** (:meth:`Cache.load`): the manifest must parse and carry the same key, the weights
  file must have the recorded size and sha256, and load. Anything else (missing, partial, truncated,
  wrong bytes, wrong key, unreadable) is logged with its reason, the entry is removed, and setup
  measures and converts as on a first boot, then stores a fresh entry: a bad entry costs one rebuild,
  never a failed setup nor a wrong result (the stored weights are the very tensors a conversion
  gives, so tokens are the same as from a clean start: tests/test_prepared.py).
- **writing** (:meth:`Cache.store`): into a temporary folder beside the entries, then one
  ``rename`` to the entry's name: a reader sees a whole entry or none (files are not fsynced: one
  cut short by a crash fails its size or hash check at the next read, which rebuilds it). Two
  processes starting together both build; the first rename wins and the second discards its copy.
  A folder that cannot be written is skipped for the next one (the image's ``weights/`` may be
  read-only: :attr:`..core.settings.Settings.prepared_dirs`); a store that fails only costs the next boot
  a rebuild.

GPUs need none of this: ``auto`` is fp16 there without measuring, and the fp16 checkpoint is
already in that format. Only CPU setups read and write entries.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
import typing as tp
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core import disk
from ..core.disk import sha256_of
from ..core.machine import cpu_flags, cpu_model
from . import formats, precision
from .runner import replaced_by_matrices

log = logging.getLogger("musicgen")

FORMAT = 1  # bump when what an entry holds, or how a format stores its matrices, changes
MANIFEST = "manifest.json"
MATRICES = "matrices.pt"
CACHED = ("auto", "fp16", "bf16", "int8", "int8dyn")  # what conversion or measurement a CPU setup pays


def applies(decoder: str, device: str) -> bool:
    """Whether a setup with this decoder on this device uses prepared entries (CPUs, not exact/stock)."""
    return str(device) == "cpu" and decoder in CACHED


def machine() -> tp.Dict[str, tp.Any]:
    """What a measurement and a conversion depend on, of the machine and torch."""
    flags = " ".join(sorted(cpu_flags()))
    return {
        "cpu": cpu_model(),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def key(
    checkpoint: tp.Mapping[str, tp.Any], decoder: str, rows: int, adapter: tp.Optional[tp.Mapping[str, tp.Any]] = None
) -> tp.Dict[str, tp.Any]:
    """The key of an entry: ``checkpoint`` is the LM checkpoint's identity, ``adapter`` that of a
    trained adapter merged into it (None: none)."""
    return {
        "format": FORMAT,
        "checkpoint": dict(checkpoint),
        "adapter": None if adapter is None else dict(adapter),
        "decoder": decoder,
        "rows": rows,
        **machine(),
        "rules": {
            "precisions": list(formats.PRECISIONS),
            "batch_invariant": list(formats.BATCH_INVARIANT),
            "bar": precision.QUALITY_BAR,
            "decided_margin": precision.DECIDED_MARGIN,
            "probe_layers": precision.PROBE_LAYERS,
            "quality_steps": precision.QUALITY_STEPS,
        },
    }


def digest(k: tp.Mapping[str, tp.Any]) -> str:
    return hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class PreparedDecoder:
    """An entry read back: what :class:`.Decoder` takes instead of measuring and converting."""

    precision: str
    trials: tp.List[precision.Trial]
    choose_s: tp.Dict[str, float]  # what measuring and converting cost when the entry was made
    created: str
    matrices: tp.Optional[tp.Dict[str, tp.Dict[str, torch.Tensor]]]  # None: exact (the LM's own)
    path: Path
    read_s: float = 0.0

    def describe(self) -> str:
        return f"read from the prepared cache in {self.read_s:.2f} s ({self.path}; measured {self.created})"


class EntryError(Exception):
    """Why an entry cannot be used (it is then removed and rebuilt)."""

    entry: Path


def _flat(named: tp.Mapping[str, tp.Mapping[str, torch.Tensor]]) -> tp.Dict[str, torch.Tensor]:
    out = {}
    for name, tensors in named.items():
        for part, t in tensors.items():
            t = t.detach().contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():  # a view: save only it
                t = t.clone()
            out[f"{name}/{part}"] = t
    return out


def _nested(flat: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, tp.Dict[str, torch.Tensor]]:
    out: tp.Dict[str, tp.Dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        matrix, part = name.rsplit("/", 1)
        out.setdefault(matrix, {})[part] = t
    return out


_ENTRY = re.compile(r"[0-9a-f]{32}")


class Cache:
    """Entries in the first of ``folders`` that holds a good one; new ones go to the first writable.
    Each folder is kept under ``max_bytes`` (None: unbounded; the service's is MUSICGEN_PREPARED_MAX_GB):
    past it, the entries used least recently are removed
    (an entry's last use is its manifest's time, touched at every read); leftovers of processes killed
    while writing are removed at every setup (:meth:`sweep`)."""

    def __init__(self, folders: tp.Sequence[Path], max_bytes: tp.Optional[int] = None):
        self.folders = [Path(f) for f in folders]
        self.max_bytes = max_bytes

    def sweep(self, keep: tp.Optional[Path] = None) -> None:
        """Remove leftovers (``.tmp-*`` of stopped processes, old ``.stale-*``) and, past the bound, the
        least recently used entries (never ``keep``). Never raises."""
        for folder in self.folders:
            if not folder.is_dir():
                continue
            disk.remove_leftovers(folder, r"\.tmp-[0-9a-f]{32}-(?P<pid>\d+)-[0-9a-f]{8}")
            disk.remove_leftovers(folder, r"\.stale-[0-9a-f]{32}-[0-9a-f]{8}")
            entries = []
            for entry in folder.iterdir():
                try:
                    if _ENTRY.fullmatch(entry.name) and entry.is_dir():
                        used = (entry / MANIFEST).stat().st_mtime if (entry / MANIFEST).exists() else 0.0
                        entries.append(disk.Entry(entry, disk.size_of(entry), used))
                except OSError:  # removed meanwhile by another process
                    continue
            if self.max_bytes is not None:
                disk.evict_least_recent(entries, self.max_bytes, keep=[keep] if keep else [])

    def load(self, k: tp.Mapping[str, tp.Any]) -> tp.Optional[PreparedDecoder]:
        """The entry for key ``k``, or None (logged: none yet, or why one was unusable and removed)."""
        return self.finish(self.read(k))

    def start(self, k: tp.Mapping[str, tp.Any]) -> "Pending":
        """Start reading the entry for ``k`` in a thread of its own (setup imports meanwhile)."""
        return Pending(self, k)

    def read(self, k: tp.Mapping[str, tp.Any]) -> tp.List[tp.Union[PreparedDecoder, EntryError]]:
        """Read and check the files of the entries for ``k`` (the first good one ends the search).
        No torch kernel runs here (file reads, hashing, a memory-mapped ``torch.load``), so it may run
        in another thread while setup imports; :meth:`finish` then takes the result."""
        self.sweep()
        found: tp.List[tp.Union[PreparedDecoder, EntryError]] = []
        for folder in self.folders:
            entry = folder / digest(k)
            if not entry.exists():
                continue
            start = time.perf_counter()
            try:
                prepared = self._read(entry, k)
            except EntryError as exc:
                exc.entry = entry
                found.append(exc)
                continue
            prepared.read_s = time.perf_counter() - start
            found.append(prepared)
            break
        return found

    def finish(self, found: tp.List[tp.Union[PreparedDecoder, EntryError]]) -> tp.Optional[PreparedDecoder]:
        """The usable entry among what :meth:`read` found (its format must still run on this torch and
        CPU, checked here, in the thread that will run it), or None; unusable entries are logged and
        removed."""
        for item in found:
            if isinstance(item, PreparedDecoder):
                reason = formats.unavailable_reason(item.precision, torch.device("cpu"))
                if reason is None:
                    try:
                        os.utime(item.path / MANIFEST)  # its last use: the least recently used go first
                    except OSError:
                        pass
                    return item
                entry, why = item.path, f"{item.precision} no longer runs here: {reason}"
            else:
                entry, why = item.entry, str(item)
            log.info("prepared decoder in %s unusable (%s): removed, rebuilding", entry, why)
            _remove(entry)
        if not found:
            log.info("prepared decoder: none yet for this checkpoint, machine and settings")
        return None

    @staticmethod
    def _read(entry: Path, k: tp.Mapping[str, tp.Any]) -> PreparedDecoder:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise EntryError(f"manifest unreadable: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("key") != json.loads(json.dumps(k)):
            raise EntryError("made for another checkpoint, machine or settings")
        try:
            trials = [precision.Trial(**t) for t in manifest["trials"]]
            chosen, weights = manifest["precision"], manifest["matrices"]
        except (KeyError, TypeError) as exc:
            raise EntryError(f"manifest incomplete: {exc}") from None
        if chosen not in formats.PRECISIONS:
            raise EntryError(f"unknown precision {chosen!r}")
        matrices = None
        if weights is not None:
            path = entry / MATRICES
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise EntryError(f"weights missing: {exc}") from None
            if size != weights.get("bytes"):
                raise EntryError(f"weights are {size} bytes, {weights.get('bytes')} were written")
            if sha256_of(path) != weights.get("sha256"):
                raise EntryError("weights changed since they were written (sha256 differs)")
            try:
                flat = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # a torch file that cannot be read, whatever torch raises
                raise EntryError(f"weights unreadable: {type(exc).__name__}: {exc}") from None
            if not isinstance(flat, dict) or sorted(flat) != sorted(weights.get("tensors", [])):
                raise EntryError("weights hold other tensors than were written")
            matrices = _nested(flat)
        return PreparedDecoder(
            precision=chosen,
            trials=trials,
            choose_s=manifest.get("choose_s", {}),
            created=manifest.get("created", "?"),
            matrices=matrices,
            path=entry,
        )

    def store(self, k: tp.Mapping[str, tp.Any], decoder: tp.Any) -> tp.Optional[Path]:
        """Write ``decoder``'s decision and matrices as the entry for ``k``; the entry's path, or None
        when no folder could take it (logged)."""
        start = time.perf_counter()
        flat = (
            None
            if decoder.runner is None or decoder.runner.exact
            else _flat({n: m.tensors() for n, m in decoder.runner.named_matrices().items()})
        )
        for folder in self.folders:
            try:
                path = self._write(folder, k, decoder, flat)
            except OSError as exc:
                log.info("prepared decoder: cannot write into %s (%s)", folder, exc.strerror or exc)
                continue
            size = (path / MATRICES).stat().st_size if flat is not None else 0
            log.info(
                "prepared decoder stored in %s (%.0f MB) in %.2f s: the next setup reads it",
                path,
                size / 1e6,
                time.perf_counter() - start,
            )
            self.sweep(keep=path)
            return path
        log.info(
            "prepared decoder: no writable folder among %s; the next setup measures again",
            ", ".join(map(str, self.folders)),
        )
        return None

    @staticmethod
    def _write(
        folder: Path, k: tp.Mapping[str, tp.Any], decoder: tp.Any, flat: tp.Optional[tp.Dict[str, torch.Tensor]]
    ) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / digest(k)
        tmp = folder / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            weights = None
            if flat is not None:
                torch.save(flat, tmp / MATRICES)  # (not fsynced: a file cut short by a crash fails
                # its size or hash check at the next read, which rebuilds it)
                weights = {
                    "bytes": (tmp / MATRICES).stat().st_size,
                    "sha256": sha256_of(tmp / MATRICES),
                    "tensors": sorted(flat),
                }
            manifest = {
                "key": k,
                "precision": decoder.mode,
                "trials": [asdict(t) for t in decoder.trials],
                "choose_s": decoder.choose_s,
                "matrices": weights,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / MANIFEST).exists():
                    raise
                log.info("prepared decoder: another process stored %s first; keeping its entry", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def _remove(entry: Path) -> None:
    """Take a bad entry out of the way atomically, then delete it (a concurrent reader that opened
    its files keeps reading them)."""
    aside = entry.with_name(f".stale-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


class Pending:
    """An entry being read in the background (:meth:`Cache.start`); :meth:`entry` waits for it."""

    def __init__(self, cache: Cache, k: tp.Mapping[str, tp.Any]):
        self.cache = cache
        self._result: tp.List[tp.Optional[PreparedDecoder]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepared-read")
        self._found = self._pool.submit(cache.read, k)

    def entry(self) -> tp.Optional[PreparedDecoder]:
        """The usable entry, or None; call it from the thread that will decode (it may run a kernel)."""
        if not self._result:
            found = self._found.result()
            self._pool.shutdown()
            self._result.append(self.cache.finish(found))
        return self._result[0]

    def skips(self, parameter: str) -> bool:
        """Whether loading may leave that LM parameter unread: the entry holds it in its format."""
        entry = self.entry()
        return entry is not None and entry.matrices is not None and replaced_by_matrices(parameter)
