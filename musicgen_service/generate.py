"""Request -> tokens -> waveform, through audiocraft's own MusicGen generation.

audiocraft does the work: text conditioning, classifier-free guidance,
top-k/top-p sampling and, past the model's 30 s window, its windowed
extension (each new window re-generates from the last ``30 - extend_stride``
seconds). This module sets the sampling parameters, seeds every random
generator, follows progress for the logs, and decodes the tokens.
"""
from __future__ import annotations

import contextlib
import random
import time
import typing as tp
from dataclasses import dataclass

from .logs import get_logger
from .request import Capabilities, Request

log = get_logger()

# audiocraft's default: past the 30 s window, each extension keeps 12 s of context.
EXTEND_STRIDE = 18.0


@dataclass
class Generated:
    wav: tp.Any  # [C, T] float32 on the CPU
    sample_rate: int
    tokens: tp.Any  # [1, K, frames]
    seed: int


def random_seed() -> int:
    return random.SystemRandom().randint(0, 2**32 - 1)


def seed_everything(seed: int) -> None:
    """Seed every generator that sampling or decoding draws from (torch covers CUDA too)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Progress:
    """Logs how much audio has been generated, about every tenth of the request, whatever the
    number of extension windows; reports positions in seconds of the final output."""

    def __init__(self, total_frames: int, frame_rate: float, stride_frames: int, step: float = 0.1):
        self.total_frames = total_frames
        self.frame_rate = frame_rate
        self.stride_frames = stride_frames
        self.step = step
        self.window = -1
        self.next_report = step
        self.start = time.perf_counter()

    def new_window(self, prompt_frames: int) -> tp.Callable[[int, int], None]:
        """The callback for one ``lm.generate`` call (one window) whose prompt has that length."""
        self.window += 1
        window_start = self.window * self.stride_frames

        def callback(generated: int, _to_generate: int) -> None:
            self.update(window_start + prompt_frames + generated)

        return callback

    def update(self, position_frames: int) -> None:
        fraction = min(position_frames / self.total_frames, 1.0)
        if fraction + 1e-9 < self.next_report:
            return
        while self.next_report <= fraction + 1e-9:
            self.next_report += self.step
        elapsed = time.perf_counter() - self.start
        log.info("generated %.1f s / %.1f s of audio (%d%%), %.1f s elapsed",
                 min(position_frames, self.total_frames) / self.frame_rate,
                 self.total_frames / self.frame_rate, round(100 * fraction), elapsed)


class Generator:
    """Runs one request at a time on a loaded MusicGen (and, when asked, MBD)."""

    def __init__(self, model: tp.Any, mbd: tp.Any = None):
        self.model = model
        self.mbd = mbd

    def capabilities(self, max_duration: int) -> Capabilities:
        return Capabilities(max_duration=max_duration, card=self.model.lm.card)

    @contextlib.contextmanager
    def _follow_windows(self, progress: Progress) -> tp.Iterator[None]:
        """Give each window's ``lm.generate`` call a progress callback that knows the window."""
        lm = self.model.lm
        stock_generate = lm.generate

        def generate(prompt: tp.Any = None, conditions: tp.Any = (), *args: tp.Any,
                     callback: tp.Any = None, **kwargs: tp.Any) -> tp.Any:
            prompt_frames = 0 if prompt is None else prompt.shape[-1]
            return stock_generate(prompt, conditions, *args,
                                  callback=progress.new_window(prompt_frames), **kwargs)

        lm.generate = generate
        try:
            yield
        finally:
            del lm.generate  # back to the class' method

    def generate(self, req: Request) -> Generated:
        import torch

        model = self.model
        seed = req.seed if req.seed is not None else random_seed()
        log.info("seed: %d%s", seed, "" if req.seed is not None else " (random)")
        model.set_generation_params(
            use_sampling=True, top_k=req.top_k, top_p=req.top_p, temperature=req.temperature,
            duration=float(req.duration), cfg_coef=float(req.classifier_free_guidance),
            extend_stride=EXTEND_STRIDE)
        progress = Progress(int(req.duration * model.frame_rate), model.frame_rate,
                            int(EXTEND_STRIDE * model.frame_rate))
        seed_everything(seed)
        start = time.perf_counter()
        with self._follow_windows(progress), torch.inference_mode():
            wav, tokens = model.generate([req.prompt], progress=False, return_tokens=True)
        seconds = time.perf_counter() - start
        log.info("generated %d s in %.2f s (%.2fx real time)", req.duration, seconds,
                 req.duration / max(seconds, 1e-9))
        return Generated(wav=wav[0].float().cpu(), sample_rate=model.sample_rate, tokens=tokens,
                         seed=seed)
