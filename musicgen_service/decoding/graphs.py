"""CUDA graphs for the ``fast`` decoder's steps (GPU only).

At batch 2, a MusicGen decoding step is a few hundred small kernels: on a GPU the
host's launch time, not the GPU, sets the pace. A CUDA graph records one step
(in :class:`~.runner.Window`'s static form: fixed shapes, the position held in a
device tensor) and replays it with a single launch. One graph is captured per
window (its caches and cross-attention keys are the graph's memory), after the
prompt's prefill; sampling stays outside the graph.

Not exercised by the test suite (it runs without a GPU); the static step it
records is (tests/test_decoding.py runs it on the CPU against the dynamic one).
"""
from __future__ import annotations

import logging
import typing as tp

import torch

log = logging.getLogger("musicgen")


class GraphedSteps:
    def __init__(self, runner: tp.Any):
        self.runner = runner

    def bind(self, window: tp.Any) -> "_Bound":
        return _Bound(window)


class _Bound:
    def __init__(self, window: tp.Any):
        self.window = window
        self.graph: tp.Optional[torch.cuda.CUDAGraph] = None
        self.tokens: tp.Optional[torch.Tensor] = None
        self.logits: tp.Optional[torch.Tensor] = None
        self.failed = False

    def _capture(self, sequence: torch.Tensor) -> None:
        window = self.window
        self.tokens = sequence.clone()
        position, host_position = window.pos_tensor.clone(), window.pos
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
                for _ in range(2):
                    window.pos_tensor.copy_(position)
                    window.step(self.tokens)
            torch.cuda.current_stream().wait_stream(stream)
            window.pos_tensor.copy_(position)
            self.graph = torch.cuda.CUDAGraph()
            # autocast's cast cache must not leak into a graph; the fast weights are in their dtype
            with torch.autocast("cuda", enabled=False), torch.cuda.graph(self.graph):
                self.logits = window.step(self.tokens)
        finally:  # warm-up ran steps and capture recorded one: back to where the window was
            window.pos_tensor.copy_(position)
            window.pos = host_position

    def step(self, sequence: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.window.step(sequence)
        if self.graph is None:
            try:
                self._capture(sequence)
            except Exception as exc:  # a capture that fails costs speed, not the prediction
                log.warning("CUDA graph capture failed (%s: %s); decoding steps run eagerly",
                            type(exc).__name__, exc)
                self.failed, self.graph = True, None
                return self.window.step(sequence)
        self.tokens.copy_(sequence)
        self.graph.replay()
        self.window.pos += 1
        return self.logits
