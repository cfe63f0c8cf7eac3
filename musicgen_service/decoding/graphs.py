"""Whole decoding steps on fixed buffers, recorded once as CUDA graphs and replayed.

At batch 2 a MusicGen decoding step is about a thousand small kernels for the
large models (48 layers): on a GPU the host's launch time, not the GPU, sets the
pace, far above the time the weights take to read (bench/results/gpu.json). Here one step is
*everything* between two tokens, on buffers that never move:

    read the previous token column (position held in a device tensor)
    -> embeddings, 24-48 layers, logits  (:meth:`.window.Window.static_step`)
    -> classifier-free guidance, sampling (:class:`.sampling.StepSampler`)
    -> pattern mask, write the token column, advance the position

so a recorded step is one graph launch and the host never waits for the device
inside the loop (progress is read from CUDA events, without blocking).

A graph is recorded per shape (batch, attention span, cross-attention length,
in steps of :data:`~.window.SPAN_STEP` / :data:`~.window.CROSS_STEP`) the first
time a window needs it, and then serves every later window and prediction of
that shape: the caches, token buffer, position and sampling parameters it reads
are the same tensors every time (:class:`~.window.StaticCaches`, the buffers
here). All graphs share one memory pool (they never run at once). Recording
time and pool size are logged. A recording that fails is logged once per shape
and counted (``failures``), and that shape's steps then run eagerly — the same
operations, so the same tokens.

Without recording (CPU, ``record=False``) the same steps run eagerly: that is
how the test suite checks, on the CPU, everything a graph would replay.
"""

from __future__ import annotations

import logging
import time
import typing as tp
from dataclasses import dataclass

import torch

from .loop import masked_column
from .runner import Runner
from .sampling import StepSampler
from .window import StaticCaches, Window

log = logging.getLogger("musicgen")


@dataclass
class _Recorded:
    graph: tp.Optional["torch.cuda.CUDAGraph"]
    window: Window  # keeps alive what the graph reads (positional embeddings, key positions)


class StepGraphs:
    """The static loop's state for one runner: caches, token buffer, sampler, recorded steps."""

    def __init__(self, runner: Runner, record: bool):
        self.runner = runner
        self.device = runner.device
        self.record = record and self.device.type == "cuda"
        self.sampler = StepSampler(self.device, runner.card)
        self.special = torch.full((), runner.lm.special_token_id, dtype=torch.long, device=self.device)
        self.caches: tp.Dict[int, StaticCaches] = {}
        self.offset = torch.zeros((1,), dtype=torch.long, device=self.device)  # the column being written
        self.tokens: tp.Optional[torch.Tensor] = None  # [B, K, capacity] gen_sequence
        self.valid: tp.Optional[torch.Tensor] = None  # [K, capacity] the pattern's mask
        self.token_generation = 0
        self.recorded: tp.Dict[tp.Tuple[int, ...], _Recorded] = {}
        self._buffers_seen: tp.Tuple[int, ...] = ()  # graphs are dropped when a buffer they read is replaced
        self.pool: tp.Any = None
        # what the logs and the GPU check report
        self.failures = 0
        self.captures = 0
        self.capture_s = 0.0
        self.replays = 0
        self.eager_steps = 0

    def caches_for(self, batch: int) -> StaticCaches:
        if batch not in self.caches:
            self.caches[batch] = StaticCaches(self.runner, batch)
        return self.caches[batch]

    # --------------------------------------------------------------------------------- a window

    def run(
        self,
        window: Window,
        gen_sequence: torch.Tensor,
        mask: torch.Tensor,
        first: int,
        cfg: bool,
        callback: tp.Optional[tp.Callable[[int, int], None]],
    ) -> None:
        """Fill ``gen_sequence`` ([B, K, S]; columns before ``first`` given) from column ``first`` on:
        the first column from the prefill, the rest by static steps. ``mask`` is the pattern's
        [K, S] validity, the sampler already holds the request's parameters."""
        B, K, S = gen_sequence.shape
        capacity = window.span
        if self.tokens is None or self.tokens.shape[:2] != (B, K) or self.tokens.shape[-1] < capacity:
            self.tokens = None  # free before allocating
            self.tokens = torch.empty((B, K, capacity), dtype=torch.long, device=self.device)
            self.valid = torch.zeros((K, capacity), dtype=torch.bool, device=self.device)
            self.token_generation += 1
        buffers = (self.token_generation, *(c.generation for c in self.caches.values()))
        if buffers != self._buffers_seen:  # graphs recorded on replaced buffers must never replay
            self.recorded.clear()
            self.pool = None  # the pool lives as long as its graphs: the next recording starts a new one
            self._buffers_seen = buffers
        tokens, valid = self.tokens, self.valid
        tokens[..., :S].copy_(gen_sequence)
        valid.zero_()
        valid[:, :S].copy_(mask)
        self.offset.fill_(first)

        prompt = tokens[..., :first]
        logits = window.prefill(torch.cat([prompt, prompt], dim=0) if cfg else prompt)
        self._commit(logits, B, cfg)
        total = S - first
        progress = _Progress(callback, total, self.device)
        progress.step(1)
        step = self._step_for(window, B, cfg)
        for done in range(2, total + 1):
            step()
            progress.step(done)
        progress.finish()
        gen_sequence.copy_(tokens[..., :S])

    # --------------------------------------------------------------------------------- one step

    def _commit(self, all_logits: torch.Tensor, B: int, cfg: bool) -> None:
        """Guidance, sampling, the pattern mask, and the new token column written at ``offset``."""
        sampler = self.sampler
        logits = sampler.guide(all_logits, B) if cfg else all_logits
        next_token = sampler(logits)  # [B, K, 1]
        valid = self.valid.index_select(1, self.offset).unsqueeze(0).expand(B, -1, -1)
        current = self.tokens.index_select(2, self.offset)
        self.tokens.index_copy_(2, self.offset, masked_column(valid, current, next_token, self.special))
        self.offset.add_(1)

    def _full_step(self, window: Window, B: int, cfg: bool) -> None:
        column = self.tokens.index_select(2, self.offset - 1)  # [B, K, 1], the previous column
        self._commit(window.static_step(torch.cat([column, column], dim=0) if cfg else column), B, cfg)

    def _step_for(self, window: Window, B: int, cfg: bool) -> tp.Callable[[], None]:
        """The step to run for this window: a graph replay, or the same operations eagerly."""
        key = (*window.shape_key(), B, int(cfg))
        eager = self._eager(window, B, cfg)
        if not self.record:
            return eager
        entry = self.recorded.get(key)
        if entry is None:
            entry = self.recorded[key] = self._capture(window, B, cfg)
        if entry.graph is None:
            return eager
        graph = entry.graph

        def replay() -> None:
            graph.replay()
            self.replays += 1

        return replay

    def _eager(self, window: Window, B: int, cfg: bool) -> tp.Callable[[], None]:
        def step() -> None:
            self._full_step(window, B, cfg)
            self.eager_steps += 1

        return step

    # --------------------------------------------------------------------------------- recording

    def _capture(self, window: Window, B: int, cfg: bool) -> _Recorded:
        """Record one full step for this window's shape. The warm-up step it needs first (lazy
        library initialisation must not happen during capture) is undone: token buffer, position
        and random state are put back, so recording changes no output."""
        caches = self.caches_for(window.batch)
        saved_tokens, saved_offset = self.tokens.clone(), self.offset.clone()
        saved_pos = caches.pos.clone()
        rng = torch.cuda.get_rng_state(self.device)
        start = time.perf_counter()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._full_step(window, B, cfg)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._restore(saved_tokens, saved_offset, caches, saved_pos, rng)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._full_step(window, B, cfg)
            if self.pool is None:
                self.pool = graph.pool()
        except Exception as exc:  # a failed recording costs speed, not the prediction
            self.failures += 1
            log.warning(
                "CUDA graph recording failed for shape %s (%s: %s); these steps run eagerly",
                window.shape_key(),
                type(exc).__name__,
                exc,
            )
            return _Recorded(None, window)
        finally:
            self._restore(saved_tokens, saved_offset, caches, saved_pos, rng)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.captures += 1
        self.capture_s += seconds
        log.info(
            "recorded the decoding step for shape %s as a CUDA graph in %.2f s (graph memory: %.0f MB; "
            "static caches: %.0f MB)",
            window.shape_key(),
            seconds,
            self.pool_bytes() / 1e6,
            sum(c.nbytes() for c in self.caches.values()) / 1e6,
        )
        return _Recorded(graph, window)

    def _restore(
        self, tokens: torch.Tensor, offset: torch.Tensor, caches: StaticCaches, pos: torch.Tensor, rng: torch.Tensor
    ) -> None:
        self.tokens.copy_(tokens)
        self.offset.copy_(offset)
        caches.pos.copy_(pos)
        torch.cuda.set_rng_state(rng, self.device)

    def pool_bytes(self) -> int:
        """Memory held by the graphs' shared pool (reserved by the caching allocator for it)."""
        if self.pool is None or not torch.cuda.is_available():
            return 0
        try:
            segments = torch.cuda.memory_snapshot()
        except Exception:  # pragma: no cover - snapshots unavailable
            return 0
        return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == tuple(self.pool))

    def stats(self) -> tp.Dict[str, tp.Any]:
        return {
            "captures": self.captures,
            "capture_s": round(self.capture_s, 3),
            "failures": self.failures,
            "replays": self.replays,
            "eager_steps": self.eager_steps,
            "graph_pool_MB": round(self.pool_bytes() / 1e6, 1),
            "static_caches_MB": round(sum(c.nbytes() for c in self.caches.values()) / 1e6, 1),
        }


class _Progress:
    """Calls ``callback(done, total)`` as steps *complete* on the device, without blocking the host:
    on CUDA an event is recorded at each tenth of the window and polled; on the CPU steps complete
    when they return."""

    def __init__(self, callback: tp.Optional[tp.Callable[[int, int], None]], total: int, device: torch.device):
        self.callback = callback
        self.total = total
        self.cuda = device.type == "cuda"
        self.every = max(1, total // 10)
        self.pending: tp.List[tp.Tuple[int, tp.Any]] = []

    def step(self, done: int) -> None:
        if self.callback is None:
            return
        if not self.cuda:
            self.callback(done, self.total)
            return
        if done % self.every == 0 or done == self.total:
            event = torch.cuda.Event()
            event.record()
            self.pending.append((done, event))
        while self.pending and self.pending[0][1].query():
            self.callback(self.pending.pop(0)[0], self.total)

    def finish(self) -> None:
        for done, event in self.pending:
            event.synchronize()
            self.callback(done, self.total)  # type: ignore[misc]
        self.pending = []
