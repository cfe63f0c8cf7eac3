"""MusicGen's transformer, one decoding step at a time, without stock audiocraft's per-step waste: the
LM's weights prepared in one precision, and the one definition of a transformer layer.

Stock audiocraft (``LMModel.forward`` in streaming mode) re-projects the text's
cross-attention keys and values in every layer at every step, grows each
layer's key/value cache with ``torch.cat`` (a full copy per step), and spends
milliseconds per step in einops and streaming-state bookkeeping. A runner
reads the same weights and does the same arithmetic, except that:

- cross-attention keys/values are computed once per window (``prefill``);
- keys/values go into caches allocated once and written in place;
- positional embeddings are computed once for the whole window.

(The window's state, its caches and its steps: :mod:`.window`.)

Precision and dtypes:

- ``exact``: the same torch operators, in the same order, on tensors with the same values as stock
  audiocraft, under whatever autocast stock runs under (audiocraft's fp16 autocast on GPUs, none on
  CPUs), so on the CPU its logits are bitwise equal to stock's (tests/test_decoding.py).
- a reduced precision (``fp16``, ``bf16``, ``int8``, ``int8dyn``): the weight matrices are converted
  once (:mod:`.formats`) and every step runs with autocast **off** and explicit casts: conditions are
  cast once per window to the residual stream's dtype (the embeddings' dtype: fp32, as stock, whose
  transformer layers are fp16 on GPUs but whose embeddings, output norm and heads stay fp32), layer
  norms run in that dtype (what autocast does for stock), each matrix product casts its input to its
  weight's dtype and its output back, attention runs in the caches' dtype, logits are fp32. The
  result is the same with autocast on or off (tested on CPU); the output heads are one matrix product.
"""

from __future__ import annotations

import contextlib
import typing as tp
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..weights.layout import is_matrix
from .formats import DENSE_DTYPES, Matrix, cast, matrix, stored_matrix
from .window import StaticCaches, Window

Attend = tp.Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def replaced_by_matrices(parameter: str) -> bool:
    """Whether a runner in a reduced precision keeps its own copy of that LM parameter (the LM's weight
    matrices: :mod:`..weights.layout`): what a prepared decoder replaces (not read from the checkpoint
    then) and what ``Decoder.release_stock_weights`` frees."""
    return is_matrix(parameter)


def unsupported_reason(lm: tp.Any) -> tp.Optional[str]:
    """Why this runner can't reproduce ``lm`` (None: it can). Covers every released MusicGen."""
    tr = lm.transformer
    if tr.positional_embedding != "sin":
        return f"positional embedding {tr.positional_embedding!r}"
    if tr.checkpointing != "none":
        return "checkpointing"
    fuse = lm.fuser.fuse2cond
    if fuse.get("sum") or fuse.get("input_interpolate"):
        return "sum / input_interpolate condition fusing"
    if lm.fuser.cross_attention_pos_emb:
        return "cross-attention positional embedding"
    norms = [lm.out_norm] + [
        n for layer in tr.layers for n in (layer.norm1, layer.norm2, getattr(layer, "norm_cross", None))
    ]
    if any(n is not None and type(n) is not torch.nn.LayerNorm for n in norms):
        return "a normalization other than LayerNorm"
    for layer in tr.layers:
        attn = layer.self_attn
        if (
            not layer.norm_first
            or not attn.custom
            or attn.rope is not None
            or attn.qk_layer_norm
            or attn.kv_repeat != 1
            or attn.past_context is not None
            or not attn.causal
        ):
            return "a transformer layer configured unlike MusicGen's"
        if layer.cross_attention is not None and (
            layer.cross_attention.qk_layer_norm or not layer.cross_attention.custom
        ):
            return "a cross-attention configured unlike MusicGen's"
    return None


@dataclass
class _Layer:
    norm1: tp.Any
    qkv: Matrix
    out: Matrix
    scale1: tp.Any
    norm_cross: tp.Any
    cross_q: tp.Optional[Matrix]
    cross_k: tp.Optional[Matrix]
    cross_v: tp.Optional[Matrix]
    cross_out: tp.Optional[Matrix]
    scale_cross: tp.Any
    norm2: tp.Any
    ff1: Matrix
    ff2: Matrix
    scale2: tp.Any
    activation: tp.Callable[[torch.Tensor], torch.Tensor]


class _Norm:
    """A LayerNorm computed in the residual stream's dtype. audiocraft builds the transformer's
    norms in the LM's dtype (fp16 on GPUs) but its embeddings, output norm and heads in fp32, so the
    residual stream is fp32 and stock relies on autocast, which runs ``layer_norm`` in fp32: this
    is that, explicitly (the weights cast once)."""

    def __init__(self, ln: torch.nn.LayerNorm, dtype: torch.dtype):
        self.shape = ln.normalized_shape
        self.eps = ln.eps
        self.weight = cast(ln.weight, dtype)
        self.bias = cast(ln.bias, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class Runner:
    """One LM's weights, prepared for step-by-step decoding in one precision (:mod:`.precision`)."""

    def __init__(
        self,
        lm: tp.Any,
        precision: str = "exact",
        layers: tp.Optional[int] = None,
        stored: tp.Optional[tp.Mapping[str, tp.Mapping[str, torch.Tensor]]] = None,
    ):
        """``precision``: ``exact`` (the parameters themselves, stock's operators), ``fp16``, ``bf16``,
        ``int8`` or ``int8dyn``. ``layers``: only the first ones (what ``auto`` times). ``stored``: the
        matrices already converted, by name (:meth:`named_matrices`' names and each matrix's
        ``tensors()``; a prepared decoder's file): the LM's own matrix parameters are not read then."""
        reason = unsupported_reason(lm)
        if reason:
            raise ValueError(f"this decoder does not support this LM: {reason}")
        self.lm = lm
        self.precision = precision
        self.exact = precision == "exact"
        self.dtype = DENSE_DTYPES.get(precision)  # None: exact, or int8 (fp32 in and out)
        tr = lm.transformer
        self.dim = lm.dim
        self.heads = tr.layers[0].self_attn.num_heads
        self.head_dim = self.dim // self.heads
        self.max_period = tr.max_period
        self.positional_scale = tr.positional_scale
        self.act_dtype = lm.emb[0].weight.dtype  # the residual stream's dtype (as stock)
        self.device = lm.emb[0].weight.device
        dim = self.dim

        def norm(module: tp.Any) -> tp.Any:  # exact: the module itself, under stock's autocast
            return module if self.exact or module is None else _Norm(module, self.act_dtype)

        def mat(name: str, w: tp.Optional[torch.Tensor], b: tp.Optional[torch.Tensor]) -> Matrix:
            if stored is not None:
                return stored_matrix(precision, stored[name])
            return matrix(precision, w, b)

        def part(t: tp.Optional[torch.Tensor], i: int) -> tp.Optional[torch.Tensor]:
            return None if t is None else t[i * dim : (i + 1) * dim]

        self.layers: tp.List[_Layer] = []
        for i, layer in enumerate(tr.layers[:layers]):
            sa, ca = layer.self_attn, layer.cross_attention
            cross = ca is not None
            n = f"layers.{i}."
            self.layers.append(
                _Layer(
                    norm1=norm(layer.norm1),
                    qkv=mat(n + "qkv", sa.in_proj_weight, sa.in_proj_bias),
                    out=mat(n + "out", sa.out_proj.weight, sa.out_proj.bias),
                    scale1=layer.layer_scale_1,
                    norm_cross=norm(getattr(layer, "norm_cross", None)),
                    # the keys/values of the text are projected once per window
                    cross_q=mat(n + "cross_q", part(ca.in_proj_weight, 0), part(ca.in_proj_bias, 0)) if cross else None,
                    cross_k=mat(n + "cross_k", part(ca.in_proj_weight, 1), part(ca.in_proj_bias, 1)) if cross else None,
                    cross_v=mat(n + "cross_v", part(ca.in_proj_weight, 2), part(ca.in_proj_bias, 2)) if cross else None,
                    cross_out=mat(n + "cross_out", ca.out_proj.weight, ca.out_proj.bias) if cross else None,
                    scale_cross=getattr(layer, "layer_scale_cross", None),
                    norm2=norm(layer.norm2),
                    ff1=mat(n + "ff1", layer.linear1.weight, layer.linear1.bias),
                    ff2=mat(n + "ff2", layer.linear2.weight, layer.linear2.bias),
                    scale2=layer.layer_scale_2,
                    activation=layer.activation,
                )
            )
        self.has_cross = self.layers[0].cross_q is not None
        self.emb = list(lm.emb)
        self.out_norm = norm(lm.out_norm)
        if self.exact:  # stock's K products
            self.output = [mat(f"output.{k}", lin.weight, lin.bias) for k, lin in enumerate(lm.linears)]
        elif stored is not None:
            self.output = [mat("output.0", None, None)]
        else:  # one product for the K output heads
            biases = [lin.bias for lin in lm.linears]
            self.output = [
                mat(
                    "output.0",
                    torch.cat([lin.weight for lin in lm.linears]),
                    None if biases[0] is None else torch.cat(biases),
                )
            ]
        self.card = lm.card
        self.n_q = lm.n_q
        self.prepend = len(lm.fuser.fuse2cond["prepend"]) > 0

    def matrices(self) -> tp.List[Matrix]:
        """Every matrix a step reads (the once-per-window cross-attention keys/values excluded)."""
        per_layer = [
            m for L in self.layers for m in (L.qkv, L.out, L.cross_q, L.cross_out, L.ff1, L.ff2) if m is not None
        ]
        return per_layer + self.output

    def named_matrices(self) -> tp.Dict[str, Matrix]:
        """Every matrix, by the name ``stored`` takes (the cross-attention keys/values included)."""
        names = ("qkv", "out", "cross_q", "cross_k", "cross_v", "cross_out", "ff1", "ff2")
        named = {
            f"layers.{i}.{n}": getattr(L, n)
            for i, L in enumerate(self.layers)
            for n in names
            if getattr(L, n) is not None
        }
        named.update({f"output.{k}": m for k, m in enumerate(self.output)})
        return named

    def step_bytes(self) -> int:
        return sum(m.nbytes for m in self.matrices())

    def default_kv_dtype(self) -> torch.dtype:
        """The caches' dtype: reduced precision pays on GPUs; on CPUs torch's fp16/bf16 attention
        kernels are 6-15x slower than fp32 ones (measured at 400-1000 keys), so the caches stay in
        the residual stream's dtype there (stock's)."""
        if self.dtype is not None and self.device.type == "cuda":
            return self.dtype
        return self.act_dtype

    def autocast(self) -> tp.ContextManager[tp.Any]:
        """A reduced precision computes with explicit dtypes and autocast off; ``exact`` under stock's autocast."""
        if self.exact:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def layer(
        self,
        L: "_Layer",
        x: torch.Tensor,
        T: int,
        attend: Attend,
        attend_cross: tp.Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One transformer layer on the residual stream ``x`` [B, T, dim] (pre-norm, as MusicGen's):
        self-attention, cross-attention (text models), feed-forward. ``attend(q, k, v)`` ([B, heads, T,
        head_dim] each) and ``attend_cross(q)`` return the merged [B, T, dim] attention outputs: the
        caller's caches (a window's, or several windows' rows at once) are theirs to read and write."""
        qkv = L.qkv(L.norm1(x))
        B = qkv.shape[0]
        q, k, v = qkv.view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + L.scale1(L.out(attend(q, k, v)).to(x.dtype))
        if L.cross_q is not None:
            x = x + L.scale_cross(L.cross_out(attend_cross(self.heads_of(L.cross_q(L.norm_cross(x))))).to(x.dtype))
        return x + L.scale2(L.ff2(L.activation(L.ff1(L.norm2(x)))).to(x.dtype))

    def heads_of(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, heads, T, head_dim]."""
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merged(t: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, head_dim] -> [B, T, dim]."""
        B, H, T, D = t.shape
        return t.transpose(1, 2).reshape(B, T, H * D)

    def start(
        self,
        condition_tensors: tp.Dict[str, tp.Any],
        batch: int,
        max_steps: int,
        caches: tp.Optional[StaticCaches] = None,
        kv_dtype: tp.Optional[torch.dtype] = None,
    ) -> Window:
        """A window of ``max_steps`` positions (plus prepended conditions). ``caches``: the static
        form's persistent caches (see :class:`.window.StaticCaches`); None: caches of this window's own."""
        return Window(self, condition_tensors, batch, max_steps, caches, kv_dtype)
