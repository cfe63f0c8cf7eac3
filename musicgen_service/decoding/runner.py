"""MusicGen's transformer, one decoding step at a time, without stock audiocraft's per-step waste.

Stock audiocraft (``LMModel.forward`` in streaming mode) re-projects the text's
cross-attention keys and values in every layer at every step, grows each
layer's key/value cache with ``torch.cat`` (a full copy per step), and spends
milliseconds per step in einops and streaming-state bookkeeping. This runner
reads the same weights and does the same arithmetic, except that:

- cross-attention keys/values are computed once per window (``start``);
- keys/values go into caches allocated once and written in place;
- positional embeddings are computed once for the whole window.

In ``exact`` precision it calls the same torch operators, in the same order, on
tensors with the same values as stock audiocraft, so its logits are bitwise
equal and sampling gives the same tokens (tests/test_decoding.py checks it).
In ``fast`` precision the weights are converted once to ``compute_dtype``
(fp16 or bf16, see :func:`~musicgen_service.decoding.fast_dtype`), the key/value
caches are kept in that dtype on GPUs (fp32 on CPUs, where reduced-precision
attention kernels are slow) and the four output heads are fused into one matrix
product; the residual stream, norms and sampling stay in the stock dtype.

``static=True`` keeps every shape fixed across steps (attention over the whole
cache with an additive mask, cache writes at a position held in a tensor): the
form a CUDA graph can capture (see :mod:`.graphs`).
"""
from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    in_w: torch.Tensor
    in_b: tp.Optional[torch.Tensor]
    out_w: torch.Tensor
    out_b: tp.Optional[torch.Tensor]
    scale1: tp.Any
    norm_cross: tp.Any
    cross_q_w: tp.Optional[torch.Tensor]
    cross_q_b: tp.Optional[torch.Tensor]
    cross_k_w: tp.Optional[torch.Tensor]
    cross_k_b: tp.Optional[torch.Tensor]
    cross_v_w: tp.Optional[torch.Tensor]
    cross_v_b: tp.Optional[torch.Tensor]
    cross_out_w: tp.Optional[torch.Tensor]
    cross_out_b: tp.Optional[torch.Tensor]
    scale_cross: tp.Any
    norm2: tp.Any
    w1: torch.Tensor
    b1: tp.Optional[torch.Tensor]
    w2: torch.Tensor
    b2: tp.Optional[torch.Tensor]
    scale2: tp.Any
    activation: tp.Callable[[torch.Tensor], torch.Tensor]


def _cast(t: tp.Optional[torch.Tensor], dtype: tp.Optional[torch.dtype]) -> tp.Optional[torch.Tensor]:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.detach().to(dtype).contiguous()


class Runner:
    """One LM's weights, prepared for step-by-step decoding in one precision."""

    def __init__(self, lm: tp.Any, compute_dtype: tp.Optional[torch.dtype] = None):
        """``compute_dtype`` None: exact (the parameters' own dtype, stock's operators)."""
        reason = unsupported_reason(lm)
        if reason:
            raise ValueError(f"the fast decoder does not support this LM: {reason}")
        self.lm = lm
        self.exact = compute_dtype is None
        self.dtype = compute_dtype
        tr = lm.transformer
        self.dim = lm.dim
        self.heads = tr.layers[0].self_attn.num_heads
        self.head_dim = self.dim // self.heads
        self.max_period = tr.max_period
        self.positional_scale = tr.positional_scale
        d = compute_dtype
        self.layers: tp.List[_Layer] = []
        for layer in tr.layers:
            sa, ca = layer.self_attn, layer.cross_attention
            dim = self.dim
            self.layers.append(_Layer(
                norm1=layer.norm1, in_w=_cast(sa.in_proj_weight, d), in_b=_cast(sa.in_proj_bias, d),
                out_w=_cast(sa.out_proj.weight, d), out_b=_cast(sa.out_proj.bias, d),
                scale1=layer.layer_scale_1,
                norm_cross=getattr(layer, "norm_cross", None),
                cross_q_w=None if ca is None else _cast(ca.in_proj_weight[:dim], d),
                cross_q_b=None if ca is None or ca.in_proj_bias is None else _cast(ca.in_proj_bias[:dim], d),
                # used once per window, in the parameters' dtype, as stock slices them
                cross_k_w=None if ca is None else ca.in_proj_weight[dim:2 * dim],
                cross_k_b=None if ca is None or ca.in_proj_bias is None else ca.in_proj_bias[dim:2 * dim],
                cross_v_w=None if ca is None else ca.in_proj_weight[2 * dim:],
                cross_v_b=None if ca is None or ca.in_proj_bias is None else ca.in_proj_bias[2 * dim:],
                cross_out_w=None if ca is None else _cast(ca.out_proj.weight, d),
                cross_out_b=None if ca is None else _cast(ca.out_proj.bias, d),
                scale_cross=getattr(layer, "layer_scale_cross", None),
                norm2=layer.norm2, w1=_cast(layer.linear1.weight, d), b1=_cast(layer.linear1.bias, d),
                w2=_cast(layer.linear2.weight, d), b2=_cast(layer.linear2.bias, d),
                scale2=layer.layer_scale_2, activation=layer.activation))
        self.emb = list(lm.emb)
        self.out_norm = lm.out_norm
        if self.exact:
            self.heads_w = [lin.weight for lin in lm.linears]
            self.heads_b = [lin.bias for lin in lm.linears]
        else:  # one product for the K output heads
            self.head_w = torch.cat([lin.weight for lin in lm.linears]).to(d).contiguous()
            biases = [lin.bias for lin in lm.linears]
            self.head_b = None if biases[0] is None else torch.cat(biases).to(d).contiguous()
        self.card = lm.card
        self.n_q = lm.n_q
        self.prepend = len(lm.fuser.fuse2cond["prepend"]) > 0

    # --------------------------------------------------------------------------------- window

    def start(self, condition_tensors: tp.Dict[str, tp.Any], batch: int, max_steps: int,
              static: bool = False) -> "Window":
        return Window(self, condition_tensors, batch, max_steps, static)


class Window:
    """The state of one ``generate`` call: caches, cached cross-attention, position."""

    def __init__(self, runner: Runner, condition_tensors: tp.Dict[str, tp.Any], batch: int,
                 max_steps: int, static: bool):
        self.r = r = runner
        self.conditions = condition_tensors
        self.batch = batch
        self.static = static
        param = r.layers[0].in_w
        self.device = param.device
        self.act_dtype = r.lm.emb[0].weight.dtype  # the residual stream's dtype (as stock)
        # Attention in reduced precision pays on GPUs; on CPUs torch's fp16/bf16 attention kernels
        # are 6-15x slower than fp32 ones (measured at 400-1000 keys), so the caches stay fp32 there.
        self.kv_dtype = r.dtype if not r.exact and self.device.type == "cuda" else self.act_dtype
        # prepended conditions (melody models) enter the sequence at the first step
        self.prefix = sum(c.shape[1] for name, (c, _) in condition_tensors.items()
                          if r.lm.fuser.cond2fuse[name] == "prepend")
        self.capacity = self.prefix + max_steps
        shape = (batch, r.heads, self.capacity, r.head_dim)
        # The dynamic step only reads the written part of the caches. The static step attends to the
        # whole cache under a -inf mask, and masked garbage still poisons it (NaN * 0 = NaN), so its
        # caches start zeroed.
        alloc = torch.zeros if static else torch.empty
        self.k = [alloc(shape, device=self.device, dtype=self.kv_dtype) for _ in r.layers]
        self.v = [alloc(shape, device=self.device, dtype=self.kv_dtype) for _ in r.layers]
        self.pos = 0
        self.pos_tensor = torch.zeros((), dtype=torch.long, device=self.device)  # static mode's position
        self.key_positions = torch.arange(self.capacity, device=self.device)
        positions = torch.arange(self.capacity, device=self.device).view(1, -1, 1)
        from audiocraft.modules.transformer import create_sin_embedding

        self.pos_emb = create_sin_embedding(positions, r.dim, max_period=r.max_period, dtype=self.act_dtype)
        self.cross_k: tp.List[tp.Optional[torch.Tensor]] = []
        self.cross_v: tp.List[tp.Optional[torch.Tensor]] = []
        self.cross_src: tp.Optional[torch.Tensor] = None

    # --------------------------------------------------------------------------------- steps

    def prefill(self, sequence: torch.Tensor) -> torch.Tensor:
        """The first step: the prompt (and any prepended conditions), causally. Returns the logits
        of the sequence's last position, [B, K, card]."""
        r = self.r
        x = self._embed(sequence)
        x, cross = r.lm.fuser(x, self.conditions)  # audiocraft's fuser: prepend / cross-attention
        if cross is not None:
            for layer in r.layers:  # once per window instead of once per step
                k = self._heads(F.linear(cross, layer.cross_k_w, layer.cross_k_b))
                v = self._heads(F.linear(cross, layer.cross_v_w, layer.cross_v_b))
                self.cross_k.append(k.to(self.kv_dtype))
                self.cross_v.append(v.to(self.kv_dtype))
        T = x.shape[1]
        x = x + r.positional_scale * self.pos_emb[:, :T]
        x = self._layers(x, T, causal=T > 1)
        logits = self._logits(x, all_positions=True)  # [B, K, S_total, card] like stock
        if r.prepend:
            logits = logits[:, :, -sequence.shape[-1]:]
        self.pos = T
        self.pos_tensor.fill_(T)
        return logits[:, :, -1]

    def step(self, sequence: torch.Tensor) -> torch.Tensor:
        """One new position, [B, K, 1] tokens -> [B, K, card] logits."""
        r = self.r
        x = self._embed(sequence)
        x = x + r.positional_scale * self._pos_emb_now()
        x = self._layers(x, 1, causal=False)
        logits = self._logits(x, all_positions=False)[:, :, -1]
        self.pos += 1
        self.pos_tensor.add_(1)
        return logits

    # --------------------------------------------------------------------------------- pieces

    def _embed(self, sequence: torch.Tensor) -> torch.Tensor:
        return sum([self.r.emb[k](sequence[:, k]) for k in range(self.r.n_q)])  # stock's order

    def _pos_emb_now(self) -> torch.Tensor:
        if self.static:
            return self.pos_emb.index_select(1, self.pos_tensor.view(1))
        return self.pos_emb[:, self.pos:self.pos + 1]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.r.heads, self.r.head_dim).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        B, H, T, D = t.shape
        return t.transpose(1, 2).reshape(B, T, H * D)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: tp.Optional[torch.Tensor]) -> torch.Tensor:
        if self.r.exact:
            return F.linear(x, w, b)
        return F.linear(x.to(w.dtype), w, b)

    def _layers(self, x: torch.Tensor, T: int, causal: bool) -> torch.Tensor:
        r = self.r
        for i, L in enumerate(r.layers):
            h = L.norm1(x)
            qkv = self._linear(h, L.in_w, L.in_b)
            B = qkv.shape[0]
            q, k, v = qkv.view(B, T, 3, r.heads, r.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = self._self_attention(i, q, k, v, T, causal)
            x = x + L.scale1(self._linear(self._merge(a), L.out_w, L.out_b).to(x.dtype))
            if L.cross_q_w is not None:
                h = L.norm_cross(x)
                q = self._heads(self._linear(h, L.cross_q_w, L.cross_q_b)).to(self.kv_dtype)
                a = F.scaled_dot_product_attention(q, self.cross_k[i], self.cross_v[i])
                x = x + L.scale_cross(self._linear(self._merge(a), L.cross_out_w, L.cross_out_b).to(x.dtype))
            h = L.norm2(x)
            f = L.activation(self._linear(h, L.w1, L.b1))
            x = x + L.scale2(self._linear(f, L.w2, L.b2).to(x.dtype))
        return x

    def _self_attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int,
                        causal: bool) -> torch.Tensor:
        kc, vc = self.k[i], self.v[i]
        if self.static and not causal:  # fixed shapes: write at pos_tensor, attend to all with a mask
            kc.index_copy_(2, self.pos_tensor.view(1), k.to(kc.dtype))
            vc.index_copy_(2, self.pos_tensor.view(1), v.to(vc.dtype))
            mask = torch.zeros(self.capacity, dtype=kc.dtype, device=self.device).masked_fill(
                self.key_positions > self.pos_tensor, float("-inf")).view(1, 1, 1, -1)
            return F.scaled_dot_product_attention(q.to(kc.dtype), kc, vc, attn_mask=mask)
        end = self.pos + T
        kc[:, :, self.pos:end] = k
        vc[:, :, self.pos:end] = v
        return F.scaled_dot_product_attention(q.to(kc.dtype), kc[:, :, :end], vc[:, :, :end], is_causal=causal)

    def _logits(self, x: torch.Tensor, all_positions: bool) -> torch.Tensor:
        r = self.r
        out = r.out_norm(x) if r.out_norm is not None else x
        if r.exact:
            return torch.stack([F.linear(out, w, b) for w, b in zip(r.heads_w, r.heads_b)], dim=1)
        B, S, _ = out.shape
        logits = F.linear(out.to(r.dtype), r.head_w, r.head_b).float()  # [B, S, K * card]
        return logits.view(B, S, r.n_q, r.card).permute(0, 2, 1, 3)  # [B, K, S, card]
