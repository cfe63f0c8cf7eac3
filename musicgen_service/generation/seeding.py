"""Seeds: a request's seed, and every random generator sampling and the melody draw from.

- :func:`random_seed`: the seed of a request (or a training) that gives none (-1 or None).
- :func:`seed_everything`: Python's, numpy's and torch's generators (CUDA's too), as stock MusicGen
  seeds them before it generates.
- demucs, which the chroma (melody) conditioner runs at every window, draws a random time shift from the
  module ``random``; stock seeds that module per generation. Concurrent requests (threads) would share
  its one state, so demucs is given a stand-in (:class:`RequestRandom`, installed once by
  :func:`install_demucs_random`) through which each thread draws from the generator of the request
  it works on (:func:`request_random`), seeded like stock's; else from ``random``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import typing as tp

from ..core.limits import MAX_SEED


def random_seed() -> int:
    """A seed drawn from the system's randomness, in the range a request's seed takes."""
    return random.SystemRandom().randint(0, MAX_SEED)


def seed_everything(seed: int) -> None:
    """Seed every generator that sampling or decoding draws from (torch covers CUDA too)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RequestRandom(threading.local):
    """Python's ``random`` for the request the current thread works on (see the module docstring)."""

    rng: tp.Optional[random.Random] = None

    def __getattr__(self, name: str) -> tp.Any:
        return getattr(random, name)

    def randint(self, a: int, b: int) -> int:
        return (self.rng or random).randint(a, b)


_REQUEST_RANDOM = RequestRandom()


def install_demucs_random() -> None:
    """Give demucs the per-thread stand-in for ``random`` (process-wide, once: setup and training call it)."""
    import demucs.apply

    demucs.apply.random = _REQUEST_RANDOM


@contextlib.contextmanager
def request_random(rng: random.Random) -> tp.Iterator[None]:
    """Within the block, demucs draws from ``rng`` in this thread."""
    previous, _REQUEST_RANDOM.rng = _REQUEST_RANDOM.rng, rng
    try:
        yield
    finally:
        _REQUEST_RANDOM.rng = previous


@contextlib.contextmanager
def demucs_random(seed: int) -> tp.Iterator[None]:
    """Within the block, demucs' random time shifts (the chroma conditioner's stem separation) in this
    thread come from a generator seeded with ``seed``: the same audio gives the same chroma (training
    tokenizes with it, so a seed gives the same run)."""
    install_demucs_random()
    with request_random(random.Random(seed)):
        yield
