"""MusicGen's transformer, one decoding step at a time, without stock audiocraft's per-step waste.

Stock audiocraft (``LMModel.forward`` in streaming mode) re-projects the text's
cross-attention keys and values in every layer at every step, grows each
layer's key/value cache with ``torch.cat`` (a full copy per step), and spends
milliseconds per step in einops and streaming-state bookkeeping. This runner
reads the same weights and does the same arithmetic, except that:

- cross-attention keys/values are computed once per window (``prefill``);
- keys/values go into caches allocated once and written in place;
- positional embeddings are computed once for the whole window.

Precision and dtypes:

- ``exact`` (``compute_dtype=None``): the same torch operators, in the same
  order, on tensors with the same values as stock audiocraft, under whatever
  autocast stock runs under (audiocraft's fp16 autocast on GPUs, none on CPUs),
  so on the CPU its logits are bitwise equal to stock's (tests/test_decoding.py).
- ``fast``: the weights are converted once to ``compute_dtype`` and every step
  runs with autocast **off** and explicit casts: conditions are cast once per
  window to the residual stream's dtype (the embeddings' dtype: fp32, as stock,
  whose transformer layers are fp16 on GPUs but whose embeddings, output norm
  and heads stay fp32), layer norms run in that dtype (what autocast does for
  stock), each matrix product casts its input to its weight's dtype and its
  output back, attention runs in the caches' dtype, logits are fp32. The result
  is the same with autocast on or off (tested on CPU); the output heads are one
  matrix product.

Two step forms:

- dynamic (:meth:`Window.step`): attends to the written part of the caches;
- static (:meth:`Window.static_step`): every shape fixed across steps and
  windows (attention over a fixed span of the cache under an additive mask,
  cache writes at a position held in a device tensor, cross-attention over a
  padded length under a mask): the form a CUDA graph can record (:mod:`.graphs`).
  Its caches live in a :class:`StaticCaches` that outlives windows, so a graph
  recorded once serves every later window and prediction of the same shape.
"""
from __future__ import annotations

import contextlib
import re
import typing as tp
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import DENSE_DTYPES, Matrix, cast, matrix, stored_matrix

# Static caches grow in these steps: a graph is recorded per (span, cross length) pair.
SPAN_STEP = 256
CROSS_STEP = 64


# The LM parameters a runner in a reduced precision holds its own copies of (the matrices'
# weights; biases, norms and embeddings are read from the LM): what a prepared decoder replaces
# (not read from the checkpoint then) and what Decoder.release_stock_weights frees.
_REPLACED = re.compile(r"^(transformer\.layers\.\d+\.(self_attn\.in_proj_weight|self_attn\.out_proj\.weight|"
                       r"cross_attention\.in_proj_weight|cross_attention\.out_proj\.weight|linear1\.weight|"
                       r"linear2\.weight)|linears\.\d+\.weight)$")


def replaced_by_matrices(parameter: str) -> bool:
    """Whether the LM parameter of that state-dict name is a matrix a reduced-precision runner keeps."""
    return _REPLACED.match(parameter) is not None


def round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


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
    norms = [lm.out_norm] + [n for layer in tr.layers for n in (layer.norm1, layer.norm2,
                                                                 getattr(layer, "norm_cross", None))]
    if any(n is not None and type(n) is not torch.nn.LayerNorm for n in norms):
        return "a normalization other than LayerNorm"
    for layer in tr.layers:
        attn = layer.self_attn
        if not layer.norm_first or not attn.custom or attn.rope is not None or attn.qk_layer_norm \
                or attn.kv_repeat != 1 or attn.past_context is not None or not attn.causal:
            return "a transformer layer configured unlike MusicGen's"
        if layer.cross_attention is not None and (layer.cross_attention.qk_layer_norm
                                                  or not layer.cross_attention.custom):
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

    def __init__(self, lm: tp.Any, precision: str = "exact", layers: tp.Optional[int] = None,
                 stored: tp.Optional[tp.Mapping[str, tp.Mapping[str, torch.Tensor]]] = None):
        """``precision``: ``exact`` (the parameters themselves, stock's operators), ``fp16``, ``bf16``,
        ``int8`` or ``int8dyn``. ``layers``: only the first ones (what ``auto`` times). ``stored``: the
        matrices already converted, by name (:meth:`named_matrices`' names and each matrix's
        ``tensors()``; a prepared decoder's file): the LM's own matrix parameters are not read then."""
        reason = unsupported_reason(lm)
        if reason:
            raise ValueError(f"the fast decoder does not support this LM: {reason}")
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
            return None if t is None else t[i * dim:(i + 1) * dim]

        self.layers: tp.List[_Layer] = []
        for i, layer in enumerate(tr.layers[:layers]):
            sa, ca = layer.self_attn, layer.cross_attention
            cross = ca is not None
            n = f"layers.{i}."
            self.layers.append(_Layer(
                norm1=norm(layer.norm1), qkv=mat(n + "qkv", sa.in_proj_weight, sa.in_proj_bias),
                out=mat(n + "out", sa.out_proj.weight, sa.out_proj.bias), scale1=layer.layer_scale_1,
                norm_cross=norm(getattr(layer, "norm_cross", None)),
                # the keys/values of the text are projected once per window
                cross_q=mat(n + "cross_q", part(ca.in_proj_weight, 0), part(ca.in_proj_bias, 0)) if cross else None,
                cross_k=mat(n + "cross_k", part(ca.in_proj_weight, 1), part(ca.in_proj_bias, 1)) if cross else None,
                cross_v=mat(n + "cross_v", part(ca.in_proj_weight, 2), part(ca.in_proj_bias, 2)) if cross else None,
                cross_out=mat(n + "cross_out", ca.out_proj.weight, ca.out_proj.bias) if cross else None,
                scale_cross=getattr(layer, "layer_scale_cross", None),
                norm2=norm(layer.norm2), ff1=mat(n + "ff1", layer.linear1.weight, layer.linear1.bias),
                ff2=mat(n + "ff2", layer.linear2.weight, layer.linear2.bias),
                scale2=layer.layer_scale_2, activation=layer.activation))
        self.has_cross = self.layers[0].cross_q is not None
        self.emb = list(lm.emb)
        self.out_norm = norm(lm.out_norm)
        if self.exact:  # stock's K products
            self.output = [mat(f"output.{k}", lin.weight, lin.bias) for k, lin in enumerate(lm.linears)]
        elif stored is not None:
            self.output = [mat("output.0", None, None)]
        else:  # one product for the K output heads
            biases = [lin.bias for lin in lm.linears]
            self.output = [mat("output.0", torch.cat([lin.weight for lin in lm.linears]),
                               None if biases[0] is None else torch.cat(biases))]
        self.card = lm.card
        self.n_q = lm.n_q
        self.prepend = len(lm.fuser.fuse2cond["prepend"]) > 0

    def matrices(self) -> tp.List[Matrix]:
        """Every matrix a step reads (the once-per-window cross-attention keys/values excluded)."""
        per_layer = [m for L in self.layers for m in (L.qkv, L.out, L.cross_q, L.cross_out, L.ff1, L.ff2)
                     if m is not None]
        return per_layer + self.output

    def named_matrices(self) -> tp.Dict[str, Matrix]:
        """Every matrix, by the name ``stored`` takes (the cross-attention keys/values included)."""
        names = ("qkv", "out", "cross_q", "cross_k", "cross_v", "cross_out", "ff1", "ff2")
        named = {f"layers.{i}.{n}": getattr(L, n) for i, L in enumerate(self.layers) for n in names
                 if getattr(L, n) is not None}
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
        """``fast`` computes with explicit dtypes and autocast off; ``exact`` under stock's autocast."""
        if self.exact:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def start(self, condition_tensors: tp.Dict[str, tp.Any], batch: int, max_steps: int,
              caches: tp.Optional["StaticCaches"] = None, kv_dtype: tp.Optional[torch.dtype] = None) -> "Window":
        """A window of ``max_steps`` positions (plus prepended conditions). ``caches``: the static
        form's persistent caches (see :class:`StaticCaches`); None: caches of this window's own."""
        return Window(self, condition_tensors, batch, max_steps, caches, kv_dtype)


class StaticCaches:
    """Key/value caches (self- and cross-attention) that outlive windows, for the static step.

    Sized in steps of ``SPAN_STEP`` positions and ``CROSS_STEP`` cross-attention keys; they grow
    (and bump ``generation``, so graphs recorded on the old buffers are dropped) when a window needs
    more. Zeroed when allocated: masked positions must hold finite values (a -inf weight times a
    NaN is NaN), and positions beyond a window only ever hold earlier windows' finite values.
    """

    def __init__(self, runner: Runner, batch: int, kv_dtype: tp.Optional[torch.dtype] = None):
        self.runner = runner
        self.batch = batch
        self.dtype = kv_dtype or runner.default_kv_dtype()
        self.capacity = 0
        self.cross_capacity = 0
        self.k: tp.List[torch.Tensor] = []
        self.v: tp.List[torch.Tensor] = []
        self.cross_k: tp.List[torch.Tensor] = []
        self.cross_v: tp.List[torch.Tensor] = []
        self.cross_mask: tp.Optional[torch.Tensor] = None
        self.pos = torch.zeros((), dtype=torch.long, device=runner.device)  # the static step's position
        self.generation = 0

    def ensure(self, capacity: int, cross_len: int) -> None:
        r = self.runner
        zeros = lambda n: [torch.zeros((self.batch, r.heads, n, r.head_dim), device=r.device,  # noqa: E731
                                       dtype=self.dtype) for _ in r.layers]
        if capacity > self.capacity:
            self.capacity = round_up(capacity, SPAN_STEP)
            self.k, self.v = [], []  # free before allocating
            self.k, self.v = zeros(self.capacity), zeros(self.capacity)
            self.generation += 1
        if r.has_cross and cross_len > self.cross_capacity:
            self.cross_capacity = round_up(cross_len, CROSS_STEP)
            self.cross_k, self.cross_v = [], []
            self.cross_k, self.cross_v = zeros(self.cross_capacity), zeros(self.cross_capacity)
            self.cross_mask = torch.zeros((1, 1, 1, self.cross_capacity), device=r.device, dtype=self.dtype)
            self.generation += 1

    def clear(self) -> None:
        """Zero every buffer, so that a window's results never depend on what earlier windows left
        in the masked positions (a memset: ~0.4 ms for the largest model's 1.6 GB on an H200)."""
        for t in self.k + self.v + self.cross_k + self.cross_v:
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.cross_k + self.cross_v)


class Window:
    """The state of one ``generate`` call: caches, cached cross-attention, position."""

    def __init__(self, runner: Runner, condition_tensors: tp.Dict[str, tp.Any], batch: int,
                 max_steps: int, caches: tp.Optional[StaticCaches], kv_dtype: tp.Optional[torch.dtype]):
        self.r = r = runner
        self.batch = batch
        self.device = r.device
        self.act_dtype = r.act_dtype
        if not r.exact:  # explicit dtypes: conditions enter in the residual stream's dtype
            condition_tensors = {name: (c.to(self.act_dtype), m) for name, (c, m) in condition_tensors.items()}
        self.conditions = condition_tensors
        # prepended conditions (melody models) enter the sequence at the first step
        self.prefix = sum(c.shape[1] for name, (c, _) in condition_tensors.items()
                          if r.lm.fuser.cond2fuse[name] == "prepend")
        self.length = self.prefix + max_steps
        cross_len = sum(c.shape[1] for name, (c, _) in condition_tensors.items()
                        if r.lm.fuser.cond2fuse[name] == "cross")
        self.static = caches is not None
        if caches is not None:
            caches.ensure(self.length, cross_len)
            caches.clear()
            self.kv_dtype = caches.dtype
            self.span = round_up(self.length, SPAN_STEP)  # the static step attends to this many keys
            self.k = [t[:, :, :self.span] for t in caches.k]
            self.v = [t[:, :, :self.span] for t in caches.v]
            self.cross_span = round_up(cross_len, CROSS_STEP) if r.has_cross else 0
            self.cross_k = [t[:, :, :self.cross_span] for t in caches.cross_k]
            self.cross_v = [t[:, :, :self.cross_span] for t in caches.cross_v]
            self.cross_mask = None if caches.cross_mask is None else caches.cross_mask[..., :self.cross_span]
        else:
            self.kv_dtype = kv_dtype or r.default_kv_dtype()
            self.span = self.length
            shape = (batch, r.heads, self.length, r.head_dim)
            self.k = [torch.empty(shape, device=self.device, dtype=self.kv_dtype) for _ in r.layers]
            self.v = [torch.empty(shape, device=self.device, dtype=self.kv_dtype) for _ in r.layers]
            self.cross_span = cross_len
            self.cross_k, self.cross_v = [], []
            self.cross_mask = None
        self.cross_len = cross_len
        self.pos = 0
        # the position as a device tensor (the static step's; shared by the windows of one StaticCaches)
        self.pos_tensor = caches.pos if caches is not None else torch.zeros((), dtype=torch.long, device=self.device)
        self.key_positions = torch.arange(self.span, device=self.device)
        positions = torch.arange(self.span, device=self.device).view(1, -1, 1)
        from audiocraft.modules.transformer import create_sin_embedding

        self.pos_emb = create_sin_embedding(positions, r.dim, max_period=r.max_period, dtype=self.act_dtype)

    def shape_key(self) -> tp.Tuple[int, int, int]:
        """What a recorded static step depends on, besides the caches' buffers."""
        return (self.batch, self.span, self.cross_span)

    # --------------------------------------------------------------------------------- steps

    def prefill(self, sequence: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """The first step: the prompt (and any prepended conditions), causally. Returns the logits
        of the sequence's last position, [B, K, card] (``all_positions``: of each of its positions,
        [B, K, T, card], teacher-forced)."""
        r = self.r
        with r.autocast():
            x = self._embed(sequence)
            x, cross = r.lm.fuser(x, self.conditions)  # audiocraft's fuser: prepend / cross-attention
            if cross is not None:
                L = cross.shape[1]
                for i, layer in enumerate(r.layers):  # once per window instead of once per step
                    k = self._heads(layer.cross_k(cross)).to(self.kv_dtype)
                    v = self._heads(layer.cross_v(cross)).to(self.kv_dtype)
                    if self.static:
                        self.cross_k[i][:, :, :L].copy_(k)
                        self.cross_v[i][:, :, :L].copy_(v)
                    else:
                        self.cross_k.append(k)
                        self.cross_v.append(v)
                if self.cross_mask is not None:  # padded keys of the static form: masked out
                    self.cross_mask.fill_(float("-inf"))
                    self.cross_mask[..., :L] = 0
            T = x.shape[1]
            x = x + r.positional_scale * self.pos_emb[:, :T]
            x = self._layers(x, T, causal=T > 1, static=False)
            logits = self._logits(x, all_positions=True)  # [B, K, S_total, card] like stock
        if r.prepend:
            logits = logits[:, :, -sequence.shape[-1]:]
        self.pos = T
        self.pos_tensor.fill_(T)
        return logits if all_positions else logits[:, :, -1]

    def step(self, sequence: torch.Tensor) -> torch.Tensor:
        """One new position, [B, K, 1] tokens -> [B, K, card] logits (dynamic shapes)."""
        r = self.r
        with r.autocast():
            x = self._embed(sequence)
            x = x + r.positional_scale * self.pos_emb[:, self.pos:self.pos + 1]
            x = self._layers(x, 1, causal=False, static=False)
            logits = self._logits(x, all_positions=False)[:, :, -1]
        self.pos += 1
        self.pos_tensor.add_(1)
        return logits

    def static_step(self, sequence: torch.Tensor) -> torch.Tensor:
        """:meth:`step` with fixed shapes: the position lives in ``pos_tensor`` (which it advances),
        attention covers ``span`` keys under a mask. What a CUDA graph records; ``self.pos`` (the
        host's copy) is left to the caller."""
        r = self.r
        with r.autocast():
            x = self._embed(sequence)
            x = x + r.positional_scale * self.pos_emb.index_select(1, self.pos_tensor.view(1))
            self._mask = torch.zeros(self.span, dtype=self.kv_dtype, device=self.device).masked_fill(
                self.key_positions > self.pos_tensor, float("-inf")).view(1, 1, 1, -1)
            x = self._layers(x, 1, causal=False, static=True)
            logits = self._logits(x, all_positions=False)[:, :, -1]
        self.pos_tensor.add_(1)
        return logits

    # --------------------------------------------------------------------------------- pieces

    def _embed(self, sequence: torch.Tensor) -> torch.Tensor:
        return sum([self.r.emb[k](sequence[:, k]) for k in range(self.r.n_q)])  # stock's order

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.r.heads, self.r.head_dim).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        B, H, T, D = t.shape
        return t.transpose(1, 2).reshape(B, T, H * D)

    def _layers(self, x: torch.Tensor, T: int, causal: bool, static: bool) -> torch.Tensor:
        r = self.r
        for i, L in enumerate(r.layers):
            h = L.norm1(x)
            qkv = L.qkv(h)
            B = qkv.shape[0]
            q, k, v = qkv.view(B, T, 3, r.heads, r.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = self._self_attention(i, q, k, v, T, causal, static)
            x = x + L.scale1(L.out(self._merge(a)).to(x.dtype))
            if L.cross_q is not None:
                h = L.norm_cross(x)
                q = self._heads(L.cross_q(h)).to(self.kv_dtype)
                if static:
                    a = F.scaled_dot_product_attention(q, self.cross_k[i], self.cross_v[i], attn_mask=self.cross_mask)
                else:
                    a = F.scaled_dot_product_attention(q, self.cross_k[i][:, :, :self.cross_len],
                                                       self.cross_v[i][:, :, :self.cross_len])
                x = x + L.scale_cross(L.cross_out(self._merge(a)).to(x.dtype))
            h = L.norm2(x)
            x = x + L.scale2(L.ff2(L.activation(L.ff1(h))).to(x.dtype))
        return x

    def _self_attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int,
                        causal: bool, static: bool) -> torch.Tensor:
        kc, vc = self.k[i], self.v[i]
        if static:  # fixed shapes: write at pos_tensor, attend to the whole span under the step's mask
            kc.index_copy_(2, self.pos_tensor.view(1), k.to(kc.dtype))
            vc.index_copy_(2, self.pos_tensor.view(1), v.to(vc.dtype))
            return F.scaled_dot_product_attention(q.to(kc.dtype), kc, vc, attn_mask=self._mask)
        end = self.pos + T
        kc[:, :, self.pos:end] = k
        vc[:, :, self.pos:end] = v
        return F.scaled_dot_product_attention(q.to(kc.dtype), kc[:, :, :end], vc[:, :, :end], is_causal=causal)

    def _logits(self, x: torch.Tensor, all_positions: bool) -> torch.Tensor:
        r = self.r
        out = r.out_norm(x) if r.out_norm is not None else x
        if r.exact:
            return torch.stack([head(out) for head in r.output], dim=1)
        B, S, _ = out.shape
        logits = r.output[0](out).float()  # [B, S, K * card]
        return logits.view(B, S, r.n_q, r.card).permute(0, 2, 1, 3)  # [B, K, S, card]


def batched_step(windows: tp.Sequence[Window], sequences: tp.Sequence[torch.Tensor], slots: int) -> tp.List[torch.Tensor]:
    """One dynamic step for several windows of one runner at once (each its own request: its own
    caches, position and conditions). The matrix products, which stream the weights, run once for
    all of them, on ``slots`` rows padded with zeros (the caller's padding policy: :class:`.rows.
    RowDecoder`), so that each row's product comes out of the same kernel whatever the other rows
    are (the CPU kernels tested give a row's bits independently of the others at a given row count;
    not fbgemm's dynamic int8, whose activation scale spans all rows). Attention runs per window, on
    shapes of its own. So a request decodes to the same bits alone or beside others. ``sequences``: [2, K, 1] tokens each
    (conditional and null rows); returns [2, K, card] logits each."""
    r = windows[0].r
    n = 2 * len(windows)
    assert n <= slots, (n, slots)
    with r.autocast():
        rows = [w._embed(seq) + r.positional_scale * w.pos_emb[:, w.pos:w.pos + 1] for w, seq in zip(windows, sequences)]
        x = torch.zeros((slots, 1, r.dim), dtype=rows[0].dtype, device=r.device)
        x[:n] = torch.cat(rows)

        def per_window(fn: tp.Callable[[int, Window], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((slots,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
            out[:n] = torch.cat([fn(j, w) for j, w in enumerate(windows)])
            return out

        for i, L in enumerate(r.layers):
            qkv = L.qkv(L.norm1(x))  # [slots, 1, 3 * dim]
            q, k, v = qkv.view(slots, 1, 3, r.heads, r.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = per_window(lambda j, w: w._merge(w._self_attention(i, q[2 * j:2 * j + 2], k[2 * j:2 * j + 2],
                                                                     v[2 * j:2 * j + 2], 1, False, False)), x)
            x = x + L.scale1(L.out(a).to(x.dtype))
            if L.cross_q is not None:
                cq = windows[0]._heads(L.cross_q(L.norm_cross(x)))
                a = per_window(lambda j, w: w._merge(F.scaled_dot_product_attention(
                    cq[2 * j:2 * j + 2].to(w.kv_dtype), w.cross_k[i][:, :, :w.cross_len],
                    w.cross_v[i][:, :, :w.cross_len])), x)
                x = x + L.scale_cross(L.cross_out(a).to(x.dtype))
            x = x + L.scale2(L.ff2(L.activation(L.ff1(L.norm2(x)))).to(x.dtype))
        logits = windows[0]._logits(x, all_positions=False)[:, :, -1]  # [slots, K, card]
    for w in windows:
        w.pos += 1
        w.pos_tensor.add_(1)
    return [logits[2 * j:2 * j + 2] for j in range(len(windows))]
