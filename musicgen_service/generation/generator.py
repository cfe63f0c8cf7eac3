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
import threading
import time
import typing as tp
from dataclasses import dataclass

from ..audio import codec
from ..core.logs import get_logger
from .request import GREEDY_BELOW, Capabilities, Request

log = get_logger()

# audiocraft's default: past the 30 s window, each extension keeps 12 s of context.
EXTEND_STRIDE = 18.0
# Room left for new music in the first window when continuing a long clip.
CONTINUATION_MARGIN = 1.0


@dataclass
class Prepared:
    """A request made ready for the LM (:meth:`Generator.prepare`)."""
    req: Request
    seed: int
    attributes: tp.Any  # audiocraft's ConditioningAttributes, one
    head: tp.Any  # continuation: prompt tokens kept as they are, before the window's prompt
    context: tp.Any  # the window's prompt tokens [1, K, T] (continuation) or None
    new_frames: int
    condition_tensors: tp.Any = None  # for a batch row: the conditions with their null twins
    say: tp.Callable[[str], None] = print

    @property
    def prompt_frames(self) -> int:
        return 0 if self.context is None else self.context.shape[-1]


@dataclass
class Generated:
    wav: tp.Any  # [C, T] float32 on the CPU
    sample_rate: int
    tokens: tp.Any  # [1, K, frames], the whole output (continuation prompt included)
    seed: int


def random_seed() -> int:
    return random.SystemRandom().randint(0, 2**32 - 1)


class _RequestRandom(threading.local):
    """Python's ``random`` for the request the current thread works on. demucs (the melody's stem
    separation, run by audiocraft's chroma conditioner at every window) draws a random time shift
    from the module ``random``; stock seeds that module per generation. Concurrent requests would
    share its one state, so demucs is given this instead: each thread draws from the generator of
    the request it is working on (:class:`request_random`), seeded like stock's; else from ``random``."""

    rng: tp.Optional[random.Random] = None

    def __getattr__(self, name: str) -> tp.Any:
        return getattr(random, name)

    def randint(self, a: int, b: int) -> int:
        return (self.rng or random).randint(a, b)


_REQUEST_RANDOM = _RequestRandom()


def _install_request_random() -> None:
    import demucs.apply

    demucs.apply.random = _REQUEST_RANDOM


class request_random:
    """Within the block, demucs draws from ``rng`` in this thread (see :class:`_RequestRandom`)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def __enter__(self) -> None:
        self.previous, _REQUEST_RANDOM.rng = _REQUEST_RANDOM.rng, self.rng

    def __exit__(self, *exc: tp.Any) -> None:
        _REQUEST_RANDOM.rng = self.previous


class demucs_random(request_random):
    """Within the block, demucs' random time shifts (the chroma conditioner's stem separation) in this
    thread come from a generator seeded with ``seed``: the same audio gives the same chroma (training
    tokenizes with it, so a seed gives the same run)."""

    def __init__(self, seed: int):
        _install_request_random()
        super().__init__(random.Random(seed))


def _seed_host_generators(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


def seed_everything(seed: int) -> None:
    """Seed every generator that sampling or decoding draws from (torch covers CUDA too)."""
    import torch

    _seed_host_generators(seed)
    torch.manual_seed(seed)


class Progress:
    """Logs how much new audio has been generated, about every tenth of the request, whatever
    the number of extension windows; positions are in seconds of new audio."""

    def __init__(self, new_frames: int, prompt_frames: int, frame_rate: float, stride_frames: int,
                 step: float = 0.1, say: tp.Optional[tp.Callable[[str], None]] = None,
                 cancelled: tp.Optional[tp.Callable[[], bool]] = None):
        """``say``: where the lines go (default: the log); ``cancelled``: checked at every step, it
        stops the generation by raising :class:`~.errors.Cancelled`."""
        self.say = say or log.info
        self.cancelled = cancelled
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
        if self.cancelled is not None and self.cancelled():
            from ..core.errors import Cancelled

            raise Cancelled("cancelled")
        fraction = min(done_frames / self.new_frames, 1.0)
        if fraction + 1e-9 < self.next_report:
            return
        while self.next_report <= fraction + 1e-9:
            self.next_report += self.step
        self.say("generated %.1f s / %.1f s of audio (%d%%), %.1f s elapsed" % (
            min(done_frames, self.new_frames) / self.frame_rate, self.new_frames / self.frame_rate,
            round(100 * fraction), time.perf_counter() - self.start))


class Generator:
    """Runs one request at a time on a loaded MusicGen, decoding in ``decoding_mode``
    (see :mod:`.decoding`: ``auto``, ``exact``, ``fp16``, ``bf16``, ``int8`` or ``stock``)."""

    def __init__(self, model: tp.Any, decoding_mode: str = "stock", rows: int = 2, prepared: tp.Any = None):
        """``rows``: matrix rows per decoding step at full load (2 per concurrent request);
        ``prepared``: the decoder's decision and weights read from disk (:mod:`.decoding.prepared`)."""
        from ..decoding import Decoder

        self.model = model
        _install_request_random()
        start = time.perf_counter()
        self.decoder = Decoder(model.lm, decoding_mode, rows=rows, prepared=prepared)
        log.info("decoding: %s (prepared in %.2f s)", self.decoder.describe(), time.perf_counter() - start)
        self.decoder.log_choice()

    @property
    def melody(self) -> bool:
        return "self_wav" in self.model.lm.condition_provider.conditioners

    def capabilities(self, max_duration: int, mbd_unavailable: tp.Optional[str] = None) -> Capabilities:
        return Capabilities(max_duration=max_duration, card=self.model.lm.card, melody=self.melody,
                            name=self.model.name, mbd_unavailable=mbd_unavailable)

    def generate(self, req: Request, clip: tp.Any = None, mbd: tp.Any = None) -> Generated:
        """Tokens for ``req`` (``clip``: the selected input audio at the model's rate and channels),
        decoded with EnCodec, or with MultiBand Diffusion when ``mbd`` is given: the one-request
        path, start to end in the calling thread."""
        prepared = self.prepare(req, clip)
        tokens = self.tokens(prepared)
        wav = self.decode(tokens, mbd)
        return Generated(wav=wav[0].float().cpu(), sample_rate=self.model.sample_rate, tokens=tokens,
                         seed=prepared.seed)

    def prepare(self, req: Request, clip: tp.Any = None, say: tp.Optional[tp.Callable[[str], None]] = None,
                tensors: bool = False) -> "Prepared":
        """Everything before the LM: the seed, the conditions (T5, chroma), the continuation prompt's
        tokens; ``tensors``: also the conditions' tensors, as one batched row needs them. The service
        runs it in its compute thread, between decoding steps (:mod:`.compute`)."""
        import torch

        say = say or log.info
        model = self.model
        fr = model.frame_rate
        seed = req.seed if req.seed is not None else random_seed()
        say("seed: %d%s" % (seed, "" if req.seed is not None else " (random)"))
        if req.greedy:
            say("temperature %g is below %g: greedy decoding (the most likely token at each step)" % (
                req.temperature, GREEDY_BELOW))
        with torch.inference_mode():
            melody = [clip.wav.to(model.device)] if req.mode == "melody" else None
            attributes, _ = model._prepare_tokens_and_attributes([req.prompt], None, melody_wavs=melody)
            head = context = None
            if req.mode == "continuation":
                prompt_tokens = codec.encode(model.compression_model, clip.wav[None].to(model.device))
                keep = int((model.max_duration - CONTINUATION_MARGIN) * fr)
                head, context = prompt_tokens[..., :-keep], prompt_tokens[..., -keep:]
            condition_tensors = None
            if tensors:  # (the melody's chroma: demucs draws what stock's random.seed(seed) gives it)
                from ..decoding.loop import condition_tensors as make_tensors

                with request_random(random.Random(seed)):
                    condition_tensors = make_tensors(model.lm, attributes)
        return Prepared(req=req, seed=seed, attributes=attributes, head=head, context=context,
                        new_frames=int(req.duration * fr), condition_tensors=condition_tensors, say=say)

    def one_window(self, prepared: "Prepared") -> bool:
        """Whether the request fits in the model's window (no extension): what a batch row can be."""
        frames = prepared.prompt_frames + prepared.new_frames
        return frames + 1 <= int(self.model.max_duration * self.model.frame_rate) and \
            (prepared.head is None or prepared.head.shape[-1] == 0)

    def tokens(self, prepared: "Prepared", cancelled: tp.Optional[tp.Callable[[], bool]] = None,
               stream: tp.Any = None) -> tp.Any:
        """The LM's tokens for one request, alone, through audiocraft's generation (windowed
        extension past the model's window) with this generator's decoder. ``stream``: a
        :class:`~.streaming.ChunkStream` that follows each window as it decodes. Not thread-safe: it
        sets the model's generation parameters; one call at a time."""
        import torch

        model = self.model
        fr = model.frame_rate
        req = prepared.req
        seed_everything(prepared.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            # +0.5 frame: audiocraft truncates duration * frame_rate to an int
            self._set_params(req, duration=(prepared.prompt_frames + prepared.new_frames + 0.5) / fr)
            progress = Progress(prepared.new_frames, prepared.prompt_frames, fr, int(EXTEND_STRIDE * fr),
                                say=prepared.say, cancelled=cancelled)
            # every window's chroma: demucs draws what it would after stock's random.seed(seed)
            with _windows_followed_by(model.lm, progress, self.decoder.generate, stream), \
                    request_random(random.Random(prepared.seed)):
                tokens = model._generate_tokens(prepared.attributes, prepared.context)
            if prepared.head is not None and prepared.head.shape[-1]:
                tokens = torch.cat([prepared.head, tokens], dim=-1)
        self.report(prepared, time.perf_counter() - start)
        return tokens

    def report(self, prepared: "Prepared", seconds: float) -> None:
        prepared.say("generated %d s in %.2f s (%.2fx real time)" % (
            prepared.req.duration, seconds, prepared.req.duration / max(seconds, 1e-9)))

    def decode(self, tokens: tp.Any, mbd: tp.Any = None) -> tp.Any:
        """[1, K, T] tokens -> [1, C, samples] float32 audio on the CPU, by EnCodec (in chunks:
        :mod:`.codec`) or MultiBand Diffusion (in windows: :mod:`.mbd`)."""
        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            if mbd is None:
                wav, decoder = codec.decode(self.model.compression_model, tokens), "EnCodec"
            else:
                from ..audio import mbd as multiband

                wav = multiband.tokens_to_wav(mbd, self.model.compression_model, tokens)
                decoder = "MultiBand Diffusion"
        log.info("decoded with %s in %.2f s", decoder, time.perf_counter() - start)
        return wav

    def _set_params(self, req: Request, duration: float) -> None:
        self.model.set_generation_params(
            use_sampling=not req.greedy, top_k=req.top_k, top_p=req.top_p, temperature=req.temperature,
            duration=duration, cfg_coef=float(req.classifier_free_guidance), extend_stride=EXTEND_STRIDE)


class _windows_followed_by:
    """Route each window's ``lm.generate`` call (audiocraft calls it once per extension window) to
    ``generate_fn`` (the chosen decoder), with a progress callback that knows where the window
    starts."""

    def __init__(self, lm: tp.Any, progress: Progress, generate_fn: tp.Callable[..., tp.Any], stream: tp.Any = None):
        self.lm = lm
        self.progress = progress
        self.generate_fn = generate_fn
        self.stream = stream

    def __enter__(self) -> None:
        stock_generate = self.generate_fn
        progress, stream = self.progress, self.stream

        def generate(prompt: tp.Any = None, conditions: tp.Any = (), *args: tp.Any,
                     callback: tp.Any = None, **kwargs: tp.Any) -> tp.Any:
            window_prompt = 0 if prompt is None else prompt.shape[-1]
            step = progress.new_window(window_prompt)
            if stream is not None:  # the stream sees the window (our decoders) and every step
                kwargs["tap"] = stream.window
                follow = step

                def step(generated: int, total: int) -> None:
                    follow(generated, total)
                    stream.step(generated)
            return stock_generate(prompt, conditions, *args, callback=step, **kwargs)

        self.lm.generate = generate

    def __exit__(self, *exc: tp.Any) -> None:
        del self.lm.generate  # back to the class' method
