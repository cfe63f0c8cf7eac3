"""A decoding window: the state of one ``generate`` call on a :class:`.runner.Runner` (caches, cached
cross-attention, position) and its steps, alone or several windows' rows at once.

Two step forms:

- dynamic (:meth:`Window.step`): attends to the written part of the caches;
- static (:meth:`Window.static_step`): every shape fixed across steps and windows (attention over a
  fixed span of the cache under an additive mask, cache writes at a position held in a device tensor,
  cross-attention over a padded length under a mask): the form a CUDA graph can record (:mod:`.graphs`).
  Its caches live in a :class:`StaticCaches` that outlives windows, so a graph recorded once serves
  every later window and prediction of the same shape.

:func:`batched_step` takes one dynamic step for several windows at once (concurrent requests): the
matrix products run once for all their rows, attention per window. Every form runs the runner's one
layer definition (:meth:`.runner.Runner.layer`).
"""

from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F

# A window's runner (a .runner.Runner) is typed loosely here: the runner starts its windows, so
# runner.py imports this module and not the other way round.
Runner = tp.Any

# Static caches grow in these steps: a graph is recorded per (span, cross length) pair.
SPAN_STEP = 256
CROSS_STEP = 64


def round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


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
        zeros = lambda n: [
            torch.zeros(
                (self.batch, r.heads, n, r.head_dim),
                device=r.device,
                dtype=self.dtype,
            )
            for _ in r.layers
        ]
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
        in the masked positions (a memset, next to nothing beside a step)."""
        for t in self.k + self.v + self.cross_k + self.cross_v:
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.cross_k + self.cross_v)


class Window:
    """The state of one ``generate`` call: caches, cached cross-attention, position."""

    def __init__(
        self,
        runner: Runner,
        condition_tensors: tp.Dict[str, tp.Any],
        batch: int,
        max_steps: int,
        caches: tp.Optional[StaticCaches],
        kv_dtype: tp.Optional[torch.dtype],
    ):
        self.r = r = runner
        self.batch = batch
        self.device = r.device
        self.act_dtype = r.act_dtype
        if not r.exact:  # explicit dtypes: conditions enter in the residual stream's dtype
            condition_tensors = {name: (c.to(self.act_dtype), m) for name, (c, m) in condition_tensors.items()}
        self.conditions = condition_tensors
        # prepended conditions (melody models) enter the sequence at the first step
        self.prefix = sum(
            c.shape[1] for name, (c, _) in condition_tensors.items() if r.lm.fuser.cond2fuse[name] == "prepend"
        )
        self.length = self.prefix + max_steps
        cross_len = sum(
            c.shape[1] for name, (c, _) in condition_tensors.items() if r.lm.fuser.cond2fuse[name] == "cross"
        )
        self.static = caches is not None
        if caches is not None:
            caches.ensure(self.length, cross_len)
            caches.clear()
            self.kv_dtype = caches.dtype
            self.span = round_up(self.length, SPAN_STEP)  # the static step attends to this many keys
            self.k = [t[:, :, : self.span] for t in caches.k]
            self.v = [t[:, :, : self.span] for t in caches.v]
            self.cross_span = round_up(cross_len, CROSS_STEP) if r.has_cross else 0
            self.cross_k = [t[:, :, : self.cross_span] for t in caches.cross_k]
            self.cross_v = [t[:, :, : self.cross_span] for t in caches.cross_v]
            self.cross_mask = None if caches.cross_mask is None else caches.cross_mask[..., : self.cross_span]
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
                    k = r.heads_of(layer.cross_k(cross)).to(self.kv_dtype)
                    v = r.heads_of(layer.cross_v(cross)).to(self.kv_dtype)
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
            logits = logits[:, :, -sequence.shape[-1] :]
        self.pos = T
        self.pos_tensor.fill_(T)
        return logits if all_positions else logits[:, :, -1]

    def step(self, sequence: torch.Tensor) -> torch.Tensor:
        """One new position, [B, K, 1] tokens -> [B, K, card] logits (dynamic shapes)."""
        r = self.r
        with r.autocast():
            x = self._embed(sequence)
            x = x + r.positional_scale * self.pos_emb[:, self.pos : self.pos + 1]
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
            self._mask = (
                torch.zeros(self.span, dtype=self.kv_dtype, device=self.device)
                .masked_fill(self.key_positions > self.pos_tensor, float("-inf"))
                .view(1, 1, 1, -1)
            )
            x = self._layers(x, 1, causal=False, static=True)
            logits = self._logits(x, all_positions=False)[:, :, -1]
        self.pos_tensor.add_(1)
        return logits

    # --------------------------------------------------------------------------------- pieces

    def _embed(self, sequence: torch.Tensor) -> torch.Tensor:
        return sum([self.r.emb[k](sequence[:, k]) for k in range(self.r.n_q)])  # stock's order

    def _layers(self, x: torch.Tensor, T: int, causal: bool, static: bool) -> torch.Tensor:
        r = self.r
        for i, L in enumerate(r.layers):

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                return r.merged(self._self_attention(i, q, k, v, T, causal, static))

            def attend_cross(q: torch.Tensor, i: int = i) -> torch.Tensor:
                return r.merged(self._cross_attention(i, q.to(self.kv_dtype), static))

            x = r.layer(L, x, T, attend, attend_cross)
        return x

    def _cross_attention(self, i: int, q: torch.Tensor, static: bool) -> torch.Tensor:
        if static:  # the padded span, its padding masked out
            return F.scaled_dot_product_attention(q, self.cross_k[i], self.cross_v[i], attn_mask=self.cross_mask)
        return F.scaled_dot_product_attention(
            q, self.cross_k[i][:, :, : self.cross_len], self.cross_v[i][:, :, : self.cross_len]
        )

    def _self_attention(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int, causal: bool, static: bool
    ) -> torch.Tensor:
        kc, vc = self.k[i], self.v[i]
        if static:  # fixed shapes: write at pos_tensor, attend to the whole span under the step's mask
            kc.index_copy_(2, self.pos_tensor.view(1), k.to(kc.dtype))
            vc.index_copy_(2, self.pos_tensor.view(1), v.to(vc.dtype))
            return F.scaled_dot_product_attention(q.to(kc.dtype), kc, vc, attn_mask=self._mask)
        end = self.pos + T
        kc[:, :, self.pos : end] = k
        vc[:, :, self.pos : end] = v
        return F.scaled_dot_product_attention(q.to(kc.dtype), kc[:, :, :end], vc[:, :, :end], is_causal=causal)

    def _logits(self, x: torch.Tensor, all_positions: bool) -> torch.Tensor:
        r = self.r
        out = r.out_norm(x) if r.out_norm is not None else x
        if r.exact:
            return torch.stack([head(out) for head in r.output], dim=1)
        B, S, _ = out.shape
        logits = r.output[0](out).float()  # [B, S, K * card]
        return logits.view(B, S, r.n_q, r.card).permute(0, 2, 1, 3)  # [B, K, S, card]


def batched_step(
    windows: tp.Sequence[Window], sequences: tp.Sequence[torch.Tensor], slots: int
) -> tp.List[torch.Tensor]:
    """One dynamic step for several windows of one runner at once (each its own request: its own
    caches, position and conditions). The matrix products, which stream the weights, run once for
    all of them, on ``slots`` rows padded with zeros (the caller's padding policy:
    :class:`.rows.RowDecoder`), so that each row's product comes out of the same kernel whatever the other rows
    are (the CPU kernels tested give a row's bits independently of the others at a given row count;
    not fbgemm's dynamic int8, whose activation scale spans all rows). Attention runs per window, on
    shapes of its own. So a request decodes to the same bits alone or beside others. ``sequences``:
    [2, K, 1] tokens each (conditional and null rows); returns [2, K, card] logits each."""
    r = windows[0].r
    n = 2 * len(windows)
    assert n <= slots, (n, slots)
    with r.autocast():
        rows = [
            w._embed(seq) + r.positional_scale * w.pos_emb[:, w.pos : w.pos + 1] for w, seq in zip(windows, sequences)
        ]
        x = torch.zeros((slots, 1, r.dim), dtype=rows[0].dtype, device=r.device)
        x[:n] = torch.cat(rows)

        template = x  # (the residual stream's shape and dtype, the same through every layer)

        def per_window(fn: tp.Callable[[int, Window], torch.Tensor]) -> torch.Tensor:
            """Each window's attention output from its own two rows, in the padded [slots, 1, dim]."""
            out = torch.zeros_like(template)
            out[:n] = torch.cat([fn(j, w) for j, w in enumerate(windows)])
            return out

        def own(t: torch.Tensor, j: int) -> torch.Tensor:
            return t[2 * j : 2 * j + 2]

        for i, L in enumerate(r.layers):

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                return per_window(
                    lambda j, w: r.merged(w._self_attention(i, own(q, j), own(k, j), own(v, j), 1, False, False))
                )

            def attend_cross(q: torch.Tensor, i: int = i) -> torch.Tensor:
                return per_window(lambda j, w: r.merged(w._cross_attention(i, own(q, j).to(w.kv_dtype), False)))

            x = r.layer(L, x, 1, attend, attend_cross)
        logits = windows[0]._logits(x, all_positions=False)[:, :, -1]  # [slots, K, card]
    for w in windows:
        w.pos += 1
        w.pos_tensor.add_(1)
    return [logits[2 * j : 2 * j + 2] for j in range(len(windows))]
