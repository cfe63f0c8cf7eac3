"""Every environment setting of the service, read in one place.

Only this module reads ``os.environ`` for configuration. All settings have a
documented default so that a container built from ``cog.yaml`` runs with no
environment at all.

| variable                   | default                                  | meaning |
|----------------------------|------------------------------------------|---------|
| ``MUSICGEN_WEIGHTS``       | ``<project>/weights``                    | Hugging Face hub cache holding every checkpoint |
| ``MUSICGEN_MODEL``         | ``facebook/musicgen-stereo-melody-large``| hub repo id, or a local folder with an audiocraft checkpoint |
| ``MUSICGEN_DEVICE``        | ``cuda`` when available, else ``cpu``    | torch device for every model |
| ``MUSICGEN_MBD``           | ``lazy``                                 | MultiBand Diffusion: ``eager`` (load in setup), ``lazy`` (load on first use) or ``off`` |
| ``MUSICGEN_MAX_DURATION``  | ``300``                                  | longest ``duration`` (seconds) a request may ask for |
| ``COG_MAX_CONCURRENCY``    | ``1``                                    | predictions in flight at once (Cog sets it from cog.yaml's ``concurrency.max``); up to this many share decoding steps |
| ``MUSICGEN_DECODER``       | ``auto``                                 | LM decoding: ``auto`` (``fast``), ``exact``, ``fp16``, ``bf16``, ``int8``, ``int8dyn`` or ``stock`` (see ``decoding``) |
| ``MUSICGEN_PREPARED``      | ``<weights>/prepared``                   | where CPU setups keep prepared decoders (``decoding.prepared``); ``off``: never. Unwritable: ``$XDG_CACHE_HOME/musicgen/prepared`` (``~/.cache``) is used |
| ``MUSICGEN_PREPARED_MAX_GB``| ``24``                                  | each prepared-decoder folder is kept under this size: the least recently used entries are removed past it |
| ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` | unset                  | set by ``torchrun`` (or any launcher of its conventions): this process is one of a multi-process training (``training.parallel``); ``MASTER_ADDR``/``MASTER_PORT`` are read by torch itself |
| ``MUSICGEN_TRAINED``       | none                                     | a trained file (or a folder holding one) to serve on top of ``MUSICGEN_MODEL`` (``trained``); ``setup(weights=...)``, Cog's ``COG_WEIGHTS``, wins over it. Downloads go to ``<weights>/trained`` (else ``$XDG_CACHE_HOME/musicgen/trained``) |
"""

from __future__ import annotations

import os
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_MODEL = "facebook/musicgen-stereo-melody-large"
DEFAULT_MAX_DURATION = 300
MBD_MODES = ("eager", "lazy", "off")
DECODERS = ("auto", "exact", "fp16", "bf16", "int8", "int8dyn", "stock", "fast")  # fast: auto's former name
DEFAULT_DECODER = "auto"
LAUNCH = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0}  # torchrun's variables and their defaults


@dataclass(frozen=True)
class Settings:
    weights_dir: Path = field(default_factory=lambda: PROJECT_ROOT / "weights")
    model: str = DEFAULT_MODEL
    device: str = "auto"
    mbd: str = "lazy"
    max_duration: int = DEFAULT_MAX_DURATION
    decoder: str = DEFAULT_DECODER
    concurrency: int = 1
    prepared: tp.Optional[Path] = None  # None: <weights_dir>/prepared
    prepared_off: bool = False
    cache_home: tp.Optional[Path] = None  # $XDG_CACHE_HOME: the writable place when the weights' folder is not
    trained: tp.Optional[str] = None  # a trained file, folder or URL
    prepared_max_gb: float = 24.0  # each prepared-decoder folder is kept under this, least recently used out
    # requests one prediction runs at once (the loop model's variations): with ``concurrency``, how
    # many share a decoding step at full load (:attr:`slots`); set by a model, not the environment
    requests_per_prediction: int = 1
    # a training launched as one of several processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)
    process_rank: int = 0
    process_world: int = 1
    process_local_rank: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SettingsError(f"COG_MAX_CONCURRENCY must be >= 1; got {self.concurrency}")
        if self.decoder not in DECODERS:
            raise SettingsError(f"MUSICGEN_DECODER must be one of {', '.join(DECODERS)}; got {self.decoder!r}")
        if self.mbd not in MBD_MODES:
            raise SettingsError(f"MUSICGEN_MBD must be one of {', '.join(MBD_MODES)}; got {self.mbd!r}")
        if self.max_duration < 1:
            raise SettingsError(f"MUSICGEN_MAX_DURATION must be >= 1; got {self.max_duration}")
        if not self.prepared_max_gb > 0:
            raise SettingsError(f"MUSICGEN_PREPARED_MAX_GB must be > 0; got {self.prepared_max_gb}")
        if not (self.process_world >= 1 and 0 <= self.process_rank < self.process_world):
            raise SettingsError(f"RANK must be in [0, WORLD_SIZE); got {self.process_rank} of {self.process_world}")

    @classmethod
    def from_env(cls, env: tp.Mapping[str, str] = os.environ) -> "Settings":
        weights = Path(env.get("MUSICGEN_WEIGHTS") or PROJECT_ROOT / "weights")
        if not weights.is_absolute():
            weights = Path.cwd() / weights
        try:
            max_duration = int(env.get("MUSICGEN_MAX_DURATION", DEFAULT_MAX_DURATION))
        except ValueError as exc:
            raise SettingsError(f"MUSICGEN_MAX_DURATION must be an integer: {exc}") from None
        try:
            concurrency = int(env.get("COG_MAX_CONCURRENCY") or 1)
        except ValueError as exc:
            raise SettingsError(f"COG_MAX_CONCURRENCY must be an integer: {exc}") from None
        try:
            prepared_max_gb = float(env.get("MUSICGEN_PREPARED_MAX_GB") or 24.0)
        except ValueError as exc:
            raise SettingsError(f"MUSICGEN_PREPARED_MAX_GB must be a number of GB: {exc}") from None
        try:
            launch = {name: int(env.get(name) or default) for name, default in LAUNCH.items()}
        except ValueError as exc:
            raise SettingsError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from None
        prepared = env.get("MUSICGEN_PREPARED") or None
        cache_home = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cls(
            prepared=None if prepared in (None, "off") else Path(prepared).expanduser().absolute(),
            prepared_off=prepared == "off",
            cache_home=cache_home,
            trained=env.get("MUSICGEN_TRAINED") or None,
            weights_dir=weights,
            model=env.get("MUSICGEN_MODEL") or DEFAULT_MODEL,
            device=env.get("MUSICGEN_DEVICE") or "auto",
            mbd=(env.get("MUSICGEN_MBD") or "lazy").lower(),
            max_duration=max_duration,
            decoder=(env.get("MUSICGEN_DECODER") or DEFAULT_DECODER).lower(),
            concurrency=concurrency,
            prepared_max_gb=prepared_max_gb,
            process_rank=launch["RANK"],
            process_world=launch["WORLD_SIZE"],
            process_local_rank=launch["LOCAL_RANK"],
        )

    @property
    def slots(self) -> int:
        """Requests that share a decoding step at full load (the scheduler's slots; 2 rows each)."""
        return self.concurrency * self.requests_per_prediction

    @property
    def prepared_dirs(self) -> tp.List[Path]:
        """Where prepared decoders are read from and written to, in order (empty: never)."""
        if self.prepared_off:
            return []
        return self._with_fallback(self.prepared or self.weights_dir / "prepared", "prepared")

    @property
    def trained_dirs(self) -> tp.List[Path]:
        """Where downloaded trained files are kept, in order of preference."""
        return self._with_fallback(self.weights_dir / "trained", "trained")

    def _with_fallback(self, first: Path, name: str) -> tp.List[Path]:
        dirs = [first]
        if self.cache_home is not None and self.cache_home / "musicgen" / name != first:
            dirs.append(self.cache_home / "musicgen" / name)
        return dirs

    def resolved_device(self) -> str:
        """The torch device to use: ``auto`` becomes ``cuda`` when a GPU is visible."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
