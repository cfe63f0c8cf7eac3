"""Request -> conditions -> tokens -> waveform, through audiocraft's own MusicGen generation.

audiocraft does the work: T5 text and chroma melody conditioning, classifier-free guidance,
top-k/top-p sampling and, past the model's 30 s window, its windowed extension (each new window
re-generates from the last ``30 - EXTEND_STRIDE`` seconds, and the melody keeps guiding every window).
A :class:`Generator` picks the mode, seeds every random generator (:mod:`.seeding`), follows progress
for the logs (:mod:`.progress`), decodes with the configured decoder (:mod:`..decoding`) and turns the
tokens into audio (:mod:`..audio.codec`, :mod:`..audio.mbd`).

It calls ``MusicGen._prepare_tokens_and_attributes`` and ``_generate_tokens``, the two steps that
audiocraft's public ``generate*`` methods run (audiocraft is pinned at 1.3.0), because continuation
needs the tokens between them; audiocraft calls ``lm.generate`` once per window, and
:func:`windows_through` routes those calls to our decoder.

Modes:
- text: ``prompt`` only;
- melody: ``prompt`` plus the chroma of the selected ``input_audio``;
- continuation: the output is the selected ``input_audio`` followed by ``duration`` seconds of new
  music. The model sees at most the last ``window - 1`` seconds of the audio as its prompt (its
  window is 30 s); earlier audio is kept in the output as it is, so any clip length works.
"""

from __future__ import annotations

import contextlib
import random
import time
import typing as tp
from dataclasses import dataclass

from ..audio import codec
from ..core.logs import get_logger
from .progress import Progress
from .request import GREEDY_BELOW, Capabilities, Request
from .seeding import install_demucs_random, random_seed, request_random, seed_everything

if tp.TYPE_CHECKING:
    import torch
    from audiocraft.models import MultiBandDiffusion, MusicGen
    from audiocraft.modules.conditioners import ConditioningAttributes

    from ..audio.input_audio import Clip
    from ..decoding.prepared import PreparedDecoder

log = get_logger()

# audiocraft's default: past the 30 s window, each extension keeps 12 s of context.
EXTEND_STRIDE = 18.0
# Room left for new music in the first window when continuing a long clip.
CONTINUATION_MARGIN = 1.0


@dataclass
class Conditioned:
    """A request conditioned for the LM (:meth:`Generator.condition`): its seed, conditions and prompt."""

    req: Request
    seed: int
    attributes: "ConditioningAttributes"  # audiocraft's, one
    head: tp.Optional["torch.Tensor"]  # continuation: prompt tokens kept as they are, before the window's prompt
    context: tp.Optional["torch.Tensor"]  # the window's prompt tokens [1, K, T] (continuation) or None
    new_frames: int
    condition_tensors: tp.Optional[tp.Dict[str, tp.Any]] = None  # for a batch row: with their null twins
    say: tp.Callable[[str], None] = print

    @property
    def prompt_frames(self) -> int:
        return 0 if self.context is None else self.context.shape[-1]


@dataclass
class Generated:
    wav: "torch.Tensor"  # [C, T] float32 on the CPU
    sample_rate: int
    tokens: "torch.Tensor"  # [1, K, frames], the whole output (continuation prompt included)
    seed: int


class Generator:
    """Runs one request at a time on a loaded MusicGen, decoding in ``decoding_mode``
    (see :mod:`..decoding`: ``auto``, ``exact``, ``fp16``, ``bf16``, ``int8``, ``int8dyn`` or ``stock``)."""

    def __init__(
        self,
        model: "MusicGen",
        decoding_mode: str = "stock",
        rows: int = 2,
        prepared: tp.Optional["PreparedDecoder"] = None,
    ):
        """``rows``: matrix rows per decoding step at full load (2 per concurrent request);
        ``prepared``: the decoder's decision and weights read from disk (:mod:`..decoding.prepared`)."""
        from ..decoding import Decoder

        self.model = model
        install_demucs_random()  # (idempotent: the melody's stem separation draws per request)
        start = time.perf_counter()
        self.decoder = Decoder(model.lm, decoding_mode, rows=rows, prepared=prepared)
        log.info("decoding: %s (prepared in %.2f s)", self.decoder.describe(), time.perf_counter() - start)
        self.decoder.log_choice()

    @property
    def melody(self) -> bool:
        return "self_wav" in self.model.lm.condition_provider.conditioners

    def capabilities(self, max_duration: int, mbd_unavailable: tp.Optional[str] = None) -> Capabilities:
        return Capabilities(
            max_duration=max_duration,
            card=self.model.lm.card,
            melody=self.melody,
            name=self.model.name,
            mbd_unavailable=mbd_unavailable,
            negative_unavailable=self.decoder.negative_unavailable,
        )

    def generate(
        self, req: Request, clip: tp.Optional["Clip"] = None, mbd: tp.Optional["MultiBandDiffusion"] = None
    ) -> Generated:
        """Tokens for ``req`` (``clip``: the selected input audio at the model's rate and channels),
        turned into audio with EnCodec, or with MultiBand Diffusion when ``mbd`` is given, start to end
        in the calling thread (the service runs the same steps: :mod:`..serving.service`)."""
        conditioned = self.condition(req, clip)
        tokens = self.tokens(conditioned)
        wav = self.to_audio(tokens, mbd)
        return Generated(
            wav=wav[0].float().cpu(), sample_rate=self.model.sample_rate, tokens=tokens, seed=conditioned.seed
        )

    def condition(
        self,
        req: Request,
        clip: tp.Optional["Clip"] = None,
        say: tp.Optional[tp.Callable[[str], None]] = None,
        tensors: bool = False,
    ) -> Conditioned:
        """Everything before the LM: the seed, the conditions (T5, chroma), the continuation prompt's
        tokens; ``tensors``: also the conditions' tensors, as one batched row needs them. The service
        runs it in its compute thread, between decoding steps (:mod:`..serving.compute`)."""
        import torch

        say = say or log.info
        model = self.model
        fr = model.frame_rate
        seed = req.seed if req.seed is not None else random_seed()
        say("seed: %d%s" % (seed, "" if req.seed is not None else " (random)"))
        if req.greedy:
            say(
                "temperature %g is below %g: greedy decoding (the most likely token at each step)"
                % (req.temperature, GREEDY_BELOW)
            )
        with torch.inference_mode():
            melody = [clip.wav.to(model.device)] if req.mode == "melody" and clip is not None else None
            attributes, _ = model._prepare_tokens_and_attributes([req.prompt], None, melody_wavs=melody)
            head = context = None
            if req.mode == "continuation" and clip is not None:
                prompt_tokens = codec.encode(model.compression_model, clip.wav[None].to(model.device))
                keep = int((model.max_duration - CONTINUATION_MARGIN) * fr)
                head, context = prompt_tokens[..., :-keep], prompt_tokens[..., -keep:]
            condition_tensors = None
            if tensors:  # (the melody's chroma: demucs draws what stock's random.seed(seed) gives it)
                from ..decoding.loop import condition_tensors as make_tensors

                with request_random(random.Random(seed)):
                    condition_tensors = make_tensors(model.lm, attributes, req.negative_prompt)
        return Conditioned(
            req=req,
            seed=seed,
            attributes=attributes,
            head=head,
            context=context,
            new_frames=int(req.duration * fr),
            condition_tensors=condition_tensors,
            say=say,
        )

    def one_window(self, conditioned: Conditioned) -> bool:
        """Whether the request fits in the model's window (no extension): what a batch row can be."""
        frames = conditioned.prompt_frames + conditioned.new_frames
        return frames + 1 <= int(self.model.max_duration * self.model.frame_rate) and (
            conditioned.head is None or conditioned.head.shape[-1] == 0
        )

    def tokens(
        self, conditioned: Conditioned, cancelled: tp.Optional[tp.Callable[[], bool]] = None, stream: tp.Any = None
    ) -> "torch.Tensor":
        """The LM's tokens for one request, alone, through audiocraft's generation (windowed
        extension past the model's window) with this generator's decoder. ``stream``: a
        :class:`~..serving.streaming.ChunkStream` that follows each window as it decodes. Not
        thread-safe: it sets the model's generation parameters; one call at a time."""
        import torch

        model = self.model
        fr = model.frame_rate
        req = conditioned.req
        seed_everything(conditioned.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            # +0.5 frame: audiocraft truncates duration * frame_rate to an int
            self._set_params(req, duration=(conditioned.prompt_frames + conditioned.new_frames + 0.5) / fr)
            progress = Progress(
                conditioned.new_frames,
                conditioned.prompt_frames,
                fr,
                int(EXTEND_STRIDE * fr),
                say=conditioned.say,
                cancelled=cancelled,
            )
            # every window's chroma: demucs draws what it would after stock's random.seed(seed)
            with (
                windows_through(model.lm, progress, self.decoder.generate, stream, req.negative_prompt),
                request_random(random.Random(conditioned.seed)),
            ):
                tokens = model._generate_tokens(conditioned.attributes, conditioned.context)
            if conditioned.head is not None and conditioned.head.shape[-1]:
                tokens = torch.cat([conditioned.head, tokens], dim=-1)
        self.report(conditioned, time.perf_counter() - start)
        return tokens

    def report(self, conditioned: Conditioned, seconds: float) -> None:
        conditioned.say(
            "generated %d s in %.2f s (%.2fx real time)"
            % (conditioned.req.duration, seconds, conditioned.req.duration / max(seconds, 1e-9))
        )

    def to_audio(self, tokens: "torch.Tensor", mbd: tp.Optional["MultiBandDiffusion"] = None) -> "torch.Tensor":
        """[1, K, T] tokens -> [1, C, samples] float32 audio on the CPU, by EnCodec (in chunks:
        :mod:`..audio.codec`) or MultiBand Diffusion (in windows: :mod:`..audio.mbd`)."""
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
            use_sampling=not req.greedy,
            top_k=req.top_k,
            top_p=req.top_p,
            temperature=req.temperature,
            duration=duration,
            cfg_coef=float(req.classifier_free_guidance),
            extend_stride=EXTEND_STRIDE,
        )


@contextlib.contextmanager
def windows_through(
    lm: tp.Any,
    progress: Progress,
    generate_fn: tp.Callable[..., tp.Any],
    stream: tp.Any = None,
    negative: tp.Optional[str] = None,
) -> tp.Iterator[None]:
    """Within the block, each window's ``lm.generate`` call (audiocraft calls it once per extension
    window) goes to ``generate_fn`` (the chosen decoder), with a progress callback that knows where the
    window starts; ``stream`` (a chunk stream) sees each window and every step; ``negative``: a
    negative prompt for every window's guidance."""

    def generate(
        prompt: tp.Any = None, conditions: tp.Any = (), *args: tp.Any, callback: tp.Any = None, **kwargs: tp.Any
    ) -> tp.Any:
        window_prompt = 0 if prompt is None else prompt.shape[-1]
        step = progress.new_window(window_prompt)
        if stream is not None:  # the stream sees the window (our decoders) and every step
            kwargs["tap"] = stream.window
            follow = step

            def step(generated: int, total: int) -> None:
                follow(generated, total)
                stream.step(generated)

        if negative:
            kwargs["negative"] = negative

        return generate_fn(prompt, conditions, *args, callback=step, **kwargs)

    lm.generate = generate
    try:
        yield
    finally:
        del lm.generate  # back to the class' method
