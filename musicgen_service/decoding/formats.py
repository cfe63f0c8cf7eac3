"""How the decoder's weight matrices are stored and multiplied, in each precision.

One class per format, all with the same face (``m(x)`` computes ``x @ w.T + b``; ``shape``,
``nbytes``), and the torch API each one rests on:

| precision | weights | product | torch API |
|---|---|---|---|
| ``exact`` | the LM's own parameters | stock's operators | ``F.linear`` (public) |
| ``fp16`` / ``bf16`` | converted once | input cast to the weight's dtype, output back | ``F.linear`` (public) |
| ``int8`` | int8 per output channel, bf16 scales | weight-only, bf16 activations | ``torch._weight_int8pack_mm`` (private op) |
| ``int8dyn`` | the same int8 weights, fbgemm-packed | activations quantized per call | ``torch.ops.quantized.linear_prepack`` / ``linear_dynamic`` (fbgemm) |

``int8dyn``'s ops are the kernels behind ``torch.ao.nn.quantized.dynamic.Linear``; torch marks
``torch.ao.quantization`` deprecated in favour of torchao, so a later torch may drop them. Every
format's availability is therefore checked by running it (:func:`unavailable_reason`): where an
op is missing, ``auto`` skips that candidate with a log line and a format named in
``MUSICGEN_DECODER`` falls back to ``exact`` (:mod:`.precision`, :class:`.Decoder`).

Which format runs on a machine, and why, is :mod:`.precision`'s business.
"""

from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F

from ..core.machine import cpu_flags

PRECISIONS = ("exact", "fp16", "bf16", "int8", "int8dyn")
# a row's product does not depend on the other rows (at a fixed row count; int8dyn's activation
# scale spans every row): what concurrent requests can share steps in (musicgen_service/serving/scheduler.py)
BATCH_INVARIANT = ("exact", "fp16", "bf16", "int8")
DENSE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cast(t: tp.Optional[torch.Tensor], dtype: tp.Optional[torch.dtype]) -> tp.Optional[torch.Tensor]:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.detach().to(dtype).contiguous()


class Dense:
    """``F.linear`` with the weight as stored (``cast_inputs``: each input cast to the weight's dtype
    and the output back, for the converted fp16/bf16 weights; exact uses the parameters as they are)."""

    def __init__(self, w: torch.Tensor, b: tp.Optional[torch.Tensor], cast_inputs: bool):
        self.w, self.b, self.cast = w, b, cast_inputs

    @classmethod
    def convert(cls, w: torch.Tensor, b: tp.Optional[torch.Tensor], dtype: tp.Optional[torch.dtype]) -> "Dense":
        """From a parameter; ``dtype`` None: the parameter itself, no copy."""
        return cls(cast(w, dtype), cast(b, dtype), dtype is not None)

    def tensors(self) -> tp.Dict[str, torch.Tensor]:
        return _present({"w": self.w, "b": self.b})

    @classmethod
    def from_tensors(cls, t: tp.Mapping[str, torch.Tensor]) -> "Dense":
        return cls(t["w"], t.get("b"), True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.w.dtype) if self.cast else x, self.w, self.b)

    @property
    def shape(self) -> tp.Tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


def _present(tensors: tp.Dict[str, tp.Optional[torch.Tensor]]) -> tp.Dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if v is not None}


# fbgemm multiplies u8 activations by s8 weights. With VNNI (vpdpbusd) the pair sums go straight to
# 32 bits; without it (AVX2's vpmaddubsw) they are saturated to 16 bits, so the activations are
# quantized to 7 bits there ("reduce_range"), which costs precision.
REDUCE_RANGE = not ({"avx512_vnni", "avx_vnni"} & cpu_flags())


def quantize(w: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 weights, fp32 scales max|w| / 127)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale


class Int8:
    """int8 weights per output channel (symmetric), weight-only: ``torch._weight_int8pack_mm``, whose
    fast CPU path takes bf16 activations (measured: 31 GB/s of int8 there, 1.5 GB/s with fp32 ones),
    so each product's input is cast to bf16 and its output back to fp32, as the bf16 mode does."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, b: tp.Optional[torch.Tensor]):
        self.q, self.scale, self.b = q, scale.to(torch.bfloat16), b
        self.shape = tuple(q.shape)

    @classmethod
    def convert(cls, w: torch.Tensor, b: tp.Optional[torch.Tensor]) -> "Int8":
        q, scale = quantize(w)
        return cls(q, scale, None if b is None else b.detach().float())

    def tensors(self) -> tp.Dict[str, torch.Tensor]:
        return _present({"q": self.q, "scale": self.scale, "b": self.b})

    @classmethod
    def from_tensors(cls, t: tp.Mapping[str, torch.Tensor]) -> "Int8":
        return cls(t["q"], t["scale"], t.get("b"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.q, self.scale).float()
        if self.b is not None:
            y = y + self.b
        return y.view(*x.shape[:-1], self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]


class Int8Dynamic:
    """int8 weights per output channel, fbgemm's dynamic int8 product (fp32 in and out)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, b: tp.Optional[torch.Tensor]):
        # Int8's very weights and scales, wrapped as a quantized tensor (5x faster than
        # torch.quantize_per_channel, measured: 2.6 vs 13.3 ms a 4096x1024 matrix; auto converts 4
        # layers of every candidate at setup), then packed in fbgemm's layout (a copy)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, b)
        self.shape = tuple(q.shape)

    @classmethod
    def convert(cls, w: torch.Tensor, b: tp.Optional[torch.Tensor]) -> "Int8Dynamic":
        q, scale = quantize(w)
        return cls(q, scale, None if b is None else b.detach().float())

    def tensors(self) -> tp.Dict[str, torch.Tensor]:
        """The int8 weights, scales and bias, unpacked from fbgemm's layout (a copy: for storing)."""
        qw, b = torch.ops.quantized.linear_unpack(self.packed)
        return _present({"q": qw.int_repr(), "scale": qw.q_per_channel_scales().float(), "b": b})

    @classmethod
    def from_tensors(cls, t: tp.Mapping[str, torch.Tensor]) -> "Int8Dynamic":
        return cls(t["q"], t["scale"], t.get("b"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, REDUCE_RANGE)
        return y.view(*x.shape[:-1], self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]


Matrix = tp.Union[Dense, Int8, Int8Dynamic]


def matrix(precision: str, w: torch.Tensor, b: tp.Optional[torch.Tensor]) -> Matrix:
    """A parameter (``w``, ``b``) converted to ``precision``'s format."""
    if precision == "int8":
        return Int8.convert(w, b)
    if precision == "int8dyn":
        return Int8Dynamic.convert(w, b)
    return Dense.convert(w, b, DENSE_DTYPES.get(precision))


def stored_matrix(precision: str, tensors: tp.Mapping[str, torch.Tensor]) -> Matrix:
    """A matrix of ``precision`` rebuilt from what its ``tensors()`` gave (a prepared decoder's file)."""
    kind = {"int8": Int8, "int8dyn": Int8Dynamic}.get(precision, Dense)
    return kind.from_tensors(tensors)


# the torch functions each format calls (beyond F.linear): checked by name before the smoke test,
# so that a torch without them names what is missing
REQUIRED_OPS = {
    "int8": ("_weight_int8pack_mm",),
    "int8dyn": ("_make_per_channel_quantized_tensor", "ops.quantized.linear_prepack", "ops.quantized.linear_dynamic"),
}


def _has(path: str) -> bool:
    """Whether ``torch.<path>`` exists (op namespaces raise on a missing op, some with RuntimeError)."""
    obj: tp.Any = torch
    try:
        for name in path.split("."):
            obj = getattr(obj, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def unavailable_reason(precision: str, device: torch.device) -> tp.Optional[str]:
    """Why ``precision`` cannot run on ``device`` (None: it can): the ops it needs, then a
    one-matrix smoke test."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}"
    if precision.startswith("int8") and device.type != "cpu":
        return "the int8 products are CPU kernels"
    missing = [f"torch.{op}" for op in REQUIRED_OPS.get(precision, ()) if not _has(op)]
    if missing:
        return f"this torch ({torch.__version__}) has no {', '.join(missing)}"
    if precision == "int8dyn" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch has no fbgemm"
    try:
        w = torch.randn(8, 16, device=device)
        matrix(precision, w, None)(torch.randn(2, 16, device=device))
    except Exception as exc:  # an unsupported dtype/kernel on this machine
        return f"{type(exc).__name__}: {exc}"
    return None
