"""Request -> tokens -> waveform, through audiocraft's own MusicGen generation.

audiocraft does the work: T5 text and chroma melody conditioning,
classifier-free guidance, top-k/top-p sampling and, past the model's 30 s
window, its windowed extension (each new window re-generates from the last
``30 - EXTEND_STRIDE`` seconds, and the melody keeps guiding every window).
This module picks the mode, seeds every random generator, follows progress for
the logs and decodes the tokens.

It calls ``MusicGen._prepare_tokens_and_attributes`` and ``_generate_tokens``,
the two steps that audiocraft's public ``generate*`` methods run (audiocraft is
pinned at 1.3.0), because continuation needs the tokens between them: see
:meth:`Generator.generate`.

Modes:
- text: ``prompt`` only;
- melody: ``prompt`` plus the chroma of the selected ``input_audio``;
- continuation: the output is the selected ``input_audio`` followed by
  ``duration`` seconds of new music. The model sees at most the last
  ``window - 1`` seconds of the audio as its prompt (its window is 30 s);
  earlier audio is kept in the output as it is, so any clip length works.
"""
from __future__ import annotations

import random
import time
import typing as tp
from dataclasses import dataclass

from . import codec
from .logs import get_logger
from .request import Capabilities, Request

log = get_logger()

# audiocraft's default: past the 30 s window, each extension keeps 12 s of context.
EXTEND_STRIDE = 18.0
# Room left for new music in the first window when continuing a long clip.
CONTINUATION_MARGIN = 1.0


@dataclass
class Generated:
    wav: tp.Any  # [C, T] float32 on the CPU
    sample_rate: int
    tokens: tp.Any  # [1, K, frames], the whole output (continuation prompt included)
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
    """Logs how much new audio has been generated, about every tenth of the request, whatever
    the number of extension windows; positions are in seconds of new audio."""

    def __init__(self, new_frames: int, prompt_frames: int, frame_rate: float, stride_frames: int,
                 step: float = 0.1):
        self.new_frames = new_frames
        self.prompt_frames = prompt_frames
        self.frame_rate = frame_rate
        self.stride_frames = stride_frames
        self.step = step
        self.window = -1
        self.next_report = step
        self.start = time.perf_counter()

    def new_window(self, window_prompt_frames: int) -> tp.Callable[[int, int], None]:
        """The callback for one ``lm.generate`` call (one window) whose prompt has that length."""
        self.window += 1
        window_start = self.window * self.stride_frames

        def callback(generated: int, _to_generate: int) -> None:
            self.update(window_start + window_prompt_frames + generated - self.prompt_frames)

        return callback

    def update(self, done_frames: int) -> None:
        fraction = min(done_frames / self.new_frames, 1.0)
        if fraction + 1e-9 < self.next_report:
            return
        while self.next_report <= fraction + 1e-9:
            self.next_report += self.step
        log.info("generated %.1f s / %.1f s of audio (%d%%), %.1f s elapsed",
                 min(done_frames, self.new_frames) / self.frame_rate, self.new_frames / self.frame_rate,
                 round(100 * fraction), time.perf_counter() - self.start)


class Generator:
    """Runs one request at a time on a loaded MusicGen, decoding in ``decoding_mode``
    (see :mod:`.decoding`: ``stock``, ``exact`` or ``fast``)."""

    def __init__(self, model: tp.Any, decoding_mode: str = "stock"):
        from .decoding import Decoder

        self.model = model
        start = time.perf_counter()
        self.decoder = Decoder(model.lm, decoding_mode)
        log.info("decoding: %s (prepared in %.2f s)", self.decoder.describe(), time.perf_counter() - start)

    @property
    def melody(self) -> bool:
        return "self_wav" in self.model.lm.condition_provider.conditioners

    def capabilities(self, max_duration: int, mbd_unavailable: tp.Optional[str] = None) -> Capabilities:
        return Capabilities(max_duration=max_duration, card=self.model.lm.card, melody=self.melody,
                            name=self.model.name, mbd_unavailable=mbd_unavailable)

    def generate(self, req: Request, clip: tp.Any = None, mbd: tp.Any = None) -> Generated:
        """Tokens for ``req`` (``clip``: the selected input audio at the model's rate and channels),
        decoded with EnCodec, or with MultiBand Diffusion when ``mbd`` is given."""
        import torch

        model = self.model
        fr = model.frame_rate
        seed = req.seed if req.seed is not None else random_seed()
        log.info("seed: %d%s", seed, "" if req.seed is not None else " (random)")
        seed_everything(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            melody = [clip.wav.to(model.device)] if req.mode == "melody" else None
            attributes, _ = model._prepare_tokens_and_attributes([req.prompt], None, melody_wavs=melody)
            head = context = None
            if req.mode == "continuation":
                prompt_tokens = codec.encode(model.compression_model, clip.wav[None].to(model.device))
                keep = int((model.max_duration - CONTINUATION_MARGIN) * fr)
                head, context = prompt_tokens[..., :-keep], prompt_tokens[..., -keep:]
            prompt_frames = 0 if context is None else context.shape[-1]
            new_frames = int(req.duration * fr)
            # +0.5 frame: audiocraft truncates duration * frame_rate to an int
            self._set_params(req, duration=(prompt_frames + new_frames + 0.5) / fr)
            progress = Progress(new_frames, prompt_frames, fr, int(EXTEND_STRIDE * fr))
            with _windows_followed_by(model.lm, progress, self.decoder.generate):
                tokens = model._generate_tokens(attributes, context)
            if head is not None and head.shape[-1]:
                tokens = torch.cat([head, tokens], dim=-1)
            seconds = time.perf_counter() - start
            log.info("generated %d s in %.2f s (%.2fx real time)", req.duration, seconds,
                     req.duration / max(seconds, 1e-9))
            wav = self.decode(tokens, mbd)
        return Generated(wav=wav[0], sample_rate=model.sample_rate, tokens=tokens,
                         seed=seed)

    def decode(self, tokens: tp.Any, mbd: tp.Any = None) -> tp.Any:
        """[1, K, T] tokens -> [1, C, samples] float32 audio on the CPU, by EnCodec (in chunks:
        :mod:`.codec`) or MultiBand Diffusion (in windows: :mod:`.mbd`)."""
        start = time.perf_counter()
        if mbd is None:
            wav, decoder = codec.decode(self.model.compression_model, tokens), "EnCodec"
        else:
            from . import mbd as multiband

            wav = multiband.tokens_to_wav(mbd, self.model.compression_model, tokens)
            decoder = "MultiBand Diffusion"
        log.info("decoded with %s in %.2f s", decoder, time.perf_counter() - start)
        return wav

    def _set_params(self, req: Request, duration: float) -> None:
        self.model.set_generation_params(
            use_sampling=True, top_k=req.top_k, top_p=req.top_p, temperature=req.temperature,
            duration=duration, cfg_coef=float(req.classifier_free_guidance), extend_stride=EXTEND_STRIDE)


class _windows_followed_by:
    """Route each window's ``lm.generate`` call (audiocraft calls it once per extension window) to
    ``generate_fn`` (the chosen decoder), with a progress callback that knows where the window
    starts."""

    def __init__(self, lm: tp.Any, progress: Progress, generate_fn: tp.Callable[..., tp.Any]):
        self.lm = lm
        self.progress = progress
        self.generate_fn = generate_fn

    def __enter__(self) -> None:
        stock_generate = self.generate_fn
        progress = self.progress

        def generate(prompt: tp.Any = None, conditions: tp.Any = (), *args: tp.Any,
                     callback: tp.Any = None, **kwargs: tp.Any) -> tp.Any:
            window_prompt = 0 if prompt is None else prompt.shape[-1]
            return stock_generate(prompt, conditions, *args, callback=progress.new_window(window_prompt),
                                  **kwargs)

        self.lm.generate = generate

    def __exit__(self, *exc: tp.Any) -> None:
        del self.lm.generate  # back to the class' method
