"""A trained file: what it holds, how it is checked, and how it becomes the served model.

**What it holds.** One safetensors file (``*.safetensors``) that a user can store and pass around:

- ``method: lora``: for each adapted matrix ``<parameter>``, ``<parameter>.lora_A`` [rank, in] and
  ``<parameter>.lora_B`` [out, rank] in fp16; the update is ``scale * B @ A`` with ``scale = alpha /
  rank`` (:mod:`.lora`);
- ``method: full``: every LM parameter (the ``best_state`` of an audiocraft checkpoint) in fp16;

and, in the file's metadata (the safetensors header's string map), ``musicgen_manifest``: the JSON of a
:class:`Manifest` (written and read by that one class): ``format`` (:data:`FORMAT`), ``base_model`` and
``base_checkpoint`` (the identity of the base's LM checkpoint: :func:`.hub.checkpoint_identity`),
``method``, ``rank``, ``alpha``, ``targets``, the training settings, a dataset summary, the losses and
when it was made.

**Where it comes from**: :mod:`.fetch` (a path, a folder or a URL).

**How it is served**: the file must name the served base model (``MUSICGEN_MODEL``) and that model's
checkpoint identity (:func:`check_base`); the whole file is checked against the checkpoint's shapes
before the model loads (:func:`validate`). A LoRA is merged into the LM's weights before the decoder
prepares them (:func:`apply`, :func:`.lora.merge`), so every decoder (``exact``, ``auto`` with its int8
formats, CUDA graphs) and batching serve it unchanged; a full fine-tune replaces the LM's parameters.
The decoder store keys its entries by the trained file's identity too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing as tp
from pathlib import Path

from ..core import disk
from ..core.errors import TrainedError
from ..core.logs import get_logger
from . import lora

if tp.TYPE_CHECKING:
    import torch
    from torch import nn

log = get_logger()

FORMAT = "musicgen-cog-trained/1"
METHODS = ("lora", "full")
MANIFEST_KEY = "musicgen_manifest"
SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a trained file says of itself."""

    base_model: str
    method: str  # lora or full
    base_checkpoint: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)  # .hub.checkpoint_identity
    rank: tp.Optional[int] = None  # lora
    alpha: tp.Optional[float] = None  # lora
    targets: tp.Any = None  # lora: the adapted weights; full: "all LM parameters"
    training: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)  # the settings, steps, seconds...
    dataset: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)  # .training.dataset.Plan.summary
    final_loss: tp.Optional[float] = None
    loss_before: tp.Optional[float] = None
    loss_after: tp.Optional[float] = None
    created: str = ""
    format: str = FORMAT

    @property
    def scale(self) -> float:
        return float(self.alpha or 0) / int(self.rank or 1)

    def as_dict(self) -> tp.Dict[str, tp.Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """The manifest of a file (``where`` names it in messages): JSON of an object, of this format,
        naming its base model and method; a LoRA's rank a whole number >= 1 and alpha a finite number
        > 0. One :class:`TrainedError` for the first problem."""
        try:
            data = json.loads(text)
        except ValueError:
            raise TrainedError(f"{where}: its training manifest is not JSON") from None
        if not isinstance(data, dict):
            raise TrainedError(f"{where}: its training manifest is not a JSON object")
        if data.get("format") != FORMAT:
            raise TrainedError(f"{where} is a trained file of format {data.get('format')!r}; "
                               f"this service reads {FORMAT!r}")
        if not isinstance(data.get("base_model"), str):
            raise TrainedError(f"{where}: its training manifest names no base model")
        if not isinstance(data.get("base_checkpoint") or {}, dict):
            raise TrainedError(f"{where}: its training manifest's base_checkpoint is not an object")
        if data.get("method") not in METHODS:
            raise TrainedError(f"{where} cannot be served: its method is {data.get('method')!r}; a trained "
                               f"file holds one of {', '.join(METHODS)}")
        if data["method"] == "lora":
            rank, alpha = data.get("rank"), data.get("alpha")
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise TrainedError(f"{where} cannot be served: its LoRA rank is {rank!r}; it must be a whole "
                                   "number >= 1")
            if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha)
                    or alpha <= 0):
                raise TrainedError(f"{where} cannot be served: its LoRA alpha is {alpha!r}; it must be a "
                                   "finite number > 0")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}  # (unknown keys: a later writer's additions)
        for name in ("base_checkpoint", "training", "dataset"):
            if not isinstance(fields.get(name) or {}, dict):
                fields[name] = {}
        return cls(**{**fields, "base_checkpoint": fields.get("base_checkpoint") or {}})

    def describe(self, file_name: str) -> str:
        what = f"LoRA rank {self.rank}" if self.method == "lora" else "full fine-tune"
        steps = self.training.get("steps", "?")
        loss = f"{self.final_loss:.3f}" if isinstance(self.final_loss, (int, float)) else "?"
        return f"{file_name}: {what} of {self.base_model}, {steps} steps, final loss {loss}"


# ------------------------------------------------------------------------------------------ writing

def write(path: Path, tensors: tp.Mapping[str, "torch.Tensor"], manifest: Manifest) -> Path:
    """Write the trained file atomically (a temporary name, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={MANIFEST_KEY: manifest.to_json()})
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
        if MANIFEST_KEY not in meta:
            raise TrainedError(f"{self.path} has no MusicGen training manifest: it was not written by "
                               "this project's trainer (script/train, cog train)")
        self.manifest = Manifest.from_json(meta[MANIFEST_KEY], str(self.path))

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def base_model(self) -> str:
        return self.manifest.base_model

    def tensors(self) -> tp.Dict[str, "torch.Tensor"]:
        from safetensors.torch import load_file

        return load_file(str(self.path))

    def identity(self) -> tp.Dict[str, tp.Any]:
        return {"sha256": disk.sha256_of(self.path), "size": self.path.stat().st_size}

    def describe(self) -> str:
        return self.manifest.describe(self.path.name)


# ------------------------------------------------------------------------------------------ checking

def check_base(trained: Trained, model: str, checkpoint: tp.Mapping[str, tp.Any]) -> None:
    """Refuse a file trained on another base than the served ``model`` (id and checkpoint)."""
    base, base_ckpt = trained.base_model, trained.manifest.base_checkpoint
    if base != model:
        raise TrainedError(f"{trained.path.name} was trained on {base}, but this service serves {model}: "
                           f"set MUSICGEN_MODEL={base} (with its weights in the weights folder) to serve it")
    if base_ckpt and dict(base_ckpt) != dict(checkpoint):
        raise TrainedError(f"{trained.path.name} was trained on {base} with checkpoint {_short(base_ckpt)}, "
                           f"but the weights folder's {model} is checkpoint {_short(checkpoint)}: another "
                           "release of the model; train again on this one")


def validate(trained: Trained, shapes: tp.Mapping[str, tp.Tuple[int, ...]]) -> None:
    """Check the whole file against the base LM checkpoint's tensor ``shapes`` (name -> shape), before
    anything is applied (the manifest was checked when the file was opened): every tensor present, of
    a float dtype, of the shape its weight needs (a 1-element tensor would broadcast into a whole
    weight), finite. One :class:`TrainedError` naming the file and the first problem."""
    import torch
    from safetensors import safe_open

    name, m = trained.path.name, trained.manifest

    def bad(problem: str) -> tp.NoReturn:
        raise TrainedError(f"{name} cannot be served: {problem}")

    expected: tp.Dict[str, tp.Tuple[int, ...]] = {}
    want: tp.Tuple[int, ...]
    if m.method == "lora":
        bases = set()
        for tensor in trained.names:
            if not tensor.endswith((lora.A_SUFFIX, lora.B_SUFFIX)):
                bad(f"it holds {tensor!r}, which is no LoRA tensor (<weight>.lora_A / .lora_B)")
            bases.add(tensor.rpartition(".")[0])
        if not bases:
            bad("it holds no LoRA tensors")
        rank = int(m.rank or 0)
        for base in sorted(bases):
            shape = shapes.get(base)
            if shape is None or len(shape) != 2:
                bad(f"it adapts {base!r}, which is no weight matrix of {trained.base_model}")
            a_name, b_name = lora.tensor_names(base)
            for part, want in ((a_name, (rank, shape[1])), (b_name, (shape[0], rank))):
                if part not in trained.names:
                    bad(f"{part} is missing")
                expected[part] = want
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


# ------------------------------------------------------------------------------------------ serving

def apply(trained: Trained, lm: "nn.Module") -> None:
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
                if p.numel():  # (empty: a stored decoder holds it, made from these weights)
                    p.copy_(tensors[name].to(p.dtype))
        else:
            lora.merge(lm, tensors, int(trained.manifest.rank or 0), float(trained.manifest.alpha or 0))
    log.info("trained weights: %s applied in %.2f s", trained.describe(), time.perf_counter() - start)

