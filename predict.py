"""Cog entry points: the public input schema of the model, and nothing else of substance.

The model page's 14 inputs (names, order, types, defaults, enums, descriptions) are defined once,
in :class:`Inputs`, and taken by both predictors:

- :class:`Predictor` (cog.yaml): one ``uri`` output, the whole file;
- :class:`StreamingPredictor` (cog.stream.yaml, a second model from this codebase): ``-> Iterator[Path]``,
  each chunk of audio as it is generated, then the whole file (docs/streaming.md);
- :class:`LoopPredictor` (cog.loop.yaml, a third): ``-> List[Path]``, loops of whole bars at an exact
  tempo, seamless when repeated, one per variation (docs/loops.md). Its own inputs are in
  :class:`LoopInputs`; the sampling inputs, the format and the seed are the main model's.

Every rule is checked, with a message naming the field, in ``musicgen_service.generation.request``; the work
happens in ``musicgen_service.serving.service`` (and ``.loops``).

`cog build` (Cog >= 0.23) reads this file without running it (a static parser, replicate/cog
pkg/schema/python): every ``Input()`` argument is a plain literal (one string per description,
literal lists and numbers), and predictors take them as ``Inputs.<name>``, which that parser
resolves within this file (its input registry, inputs.go). A test keeps these literals equal to
``musicgen_service.generation.request``'s rules.

``Predictor.predict`` is async, as Cog requires for ``concurrency.max`` > 1 (cog.yaml): each
prediction waits for the service in a thread of its own (the service does its torch work in its one
compute thread), the service's scheduler lets concurrent predictions share the LM's decoding steps,
and a cancelled prediction stops at the next step. ``StreamingPredictor.predict`` is a sync
generator: coglet streams only those (an async generator's items arrive at the end), so the
streaming model takes one prediction at a time.
"""

import asyncio
import threading
from typing import Iterator, List, Optional

from cog import BasePredictor, Input, Path, streaming


class Inputs:
    """The model page's inputs, defined once for both predictors."""

    prompt = Input(description="A description of the music you want to generate.", default=None)
    input_audio = Input(
        description="An audio file that will influence the generated music. If `continuation` is `True`, the generated music will be a continuation of the audio file. Otherwise, the generated music will mimic the audio file's melody.",
        default=None,
    )
    duration = Input(description="Duration of the generated audio in seconds.", default=8, ge=1)
    continuation = Input(
        description="If `True`, generated music will continue `melody`. Otherwise, generated music will mimic `audio_input`'s melody.",
        default=False,
    )
    continuation_start = Input(description="Start time of the audio file to use for continuation.", default=0, ge=0)
    continuation_end = Input(
        description="End time of the audio file to use for continuation. If -1 or None, will default to the end of the audio clip.",
        default=None,
        ge=-1,
    )
    multi_band_diffusion = Input(
        description="If `True`, the EnCodec tokens will be decoded with MultiBand Diffusion. Only works with non-stereo models.",
        default=False,
    )
    normalization_strategy = Input(
        description="Strategy for normalizing audio.", default="loudness", choices=["loudness", "clip", "peak", "rms"]
    )
    top_k = Input(description="Reduces sampling to the k most likely tokens.", default=250, ge=0)
    top_p = Input(
        description="Reduces sampling to tokens with cumulative probability of p. When set to `0` (default), top_k sampling is used.",
        default=0.0,
        ge=0.0,
        le=1.0,
    )
    temperature = Input(
        description="Controls the 'conservativeness' of the sampling process. Higher temperature means more diversity.",
        default=1.0,
        ge=0.0,
    )
    classifier_free_guidance = Input(
        description="Increases the influence of inputs on the output. Higher values produce lower-varience outputs that adhere more closely to inputs.",
        default=3,
        ge=0,
    )
    output_format = Input(description="Output format for generated audio.", default="wav", choices=["wav", "mp3"])
    seed = Input(
        description="Seed for random number generator. If None or -1, a random seed will be used.",
        default=None,
        ge=-1,
        le=4294967295,
    )


class LoopInputs:
    """The loop model's own inputs (the rest are :class:`Inputs`')."""

    prompt = Input(description="A description of the music to loop. The tempo is added to it.")
    negative_prompt = Input(
        description="What the music should not be: guidance steers away from this text (e.g. `vocals, drums`).",
        default="",
    )
    bpm = Input(
        description="Tempo of the loops in beats per minute: each loop is stretched to it exactly.",
        default=120.0,
        ge=40.0,
        le=300.0,
    )
    bars = Input(description="Length of each loop in bars.", default=4, choices=[1, 2, 4, 8, 16])
    beats_per_bar = Input(description="Beats in a bar (4 for 4/4, 3 for 3/4).", default=4, ge=2, le=12)
    variations = Input(
        description="Number of loops: the first, then variations that continue it, each seamless on its own.",
        default=4,
        ge=1,
        le=8,
    )
    input_audio = Input(description="An audio file whose melody the first loop follows.", default=None)


class Predictor(BasePredictor):
    def setup(self, weights: Optional[Path] = None) -> None:
        """``weights``: a trained version's weights (Cog passes ``COG_WEIGHTS``: a path or URL of a file
        made by ``cog train`` / ``script/train``), served on top of the base model."""
        from musicgen_service.core.settings import Settings
        from musicgen_service.serving.service import Service

        self.service = Service(Settings.from_env(), trained=str(weights) if weights else None)

    async def predict(
        self,
        prompt: Optional[str] = Inputs.prompt,
        input_audio: Optional[Path] = Inputs.input_audio,
        duration: int = Inputs.duration,
        continuation: bool = Inputs.continuation,
        continuation_start: int = Inputs.continuation_start,
        continuation_end: Optional[int] = Inputs.continuation_end,
        multi_band_diffusion: bool = Inputs.multi_band_diffusion,
        normalization_strategy: str = Inputs.normalization_strategy,
        top_k: int = Inputs.top_k,
        top_p: float = Inputs.top_p,
        temperature: float = Inputs.temperature,
        classifier_free_guidance: int = Inputs.classifier_free_guidance,
        output_format: str = Inputs.output_format,
        seed: Optional[int] = Inputs.seed,
    ) -> Path:
        request = self.service.parse(**_inputs(locals()))
        return Path(await _cancellable(self.service.run, request))


class StreamingPredictor(Predictor):
    """The streaming model (cog.stream.yaml): the same inputs and service, the audio in chunks."""

    @streaming
    def predict(  # type: ignore[override]
        self,
        prompt: Optional[str] = Inputs.prompt,
        input_audio: Optional[Path] = Inputs.input_audio,
        duration: int = Inputs.duration,
        continuation: bool = Inputs.continuation,
        continuation_start: int = Inputs.continuation_start,
        continuation_end: Optional[int] = Inputs.continuation_end,
        multi_band_diffusion: bool = Inputs.multi_band_diffusion,
        normalization_strategy: str = Inputs.normalization_strategy,
        top_k: int = Inputs.top_k,
        top_p: float = Inputs.top_p,
        temperature: float = Inputs.temperature,
        classifier_free_guidance: int = Inputs.classifier_free_guidance,
        output_format: str = Inputs.output_format,
        seed: Optional[int] = Inputs.seed,
    ) -> Iterator[Path]:
        request = self.service.parse(**_inputs(locals()))
        for path in self.service.stream(request):
            yield Path(path)


class LoopPredictor(BasePredictor):
    """The loop model (cog.loop.yaml): loops for producers, on the same service."""

    def setup(self, weights: Optional[Path] = None) -> None:
        from musicgen_service.core.settings import Settings
        from musicgen_service.serving.loops import LoopService

        self.loops = LoopService(Settings.from_env(), trained=str(weights) if weights else None)

    async def predict(
        self,
        prompt: str = LoopInputs.prompt,
        negative_prompt: str = LoopInputs.negative_prompt,
        bpm: float = LoopInputs.bpm,
        bars: int = LoopInputs.bars,
        beats_per_bar: int = LoopInputs.beats_per_bar,
        variations: int = LoopInputs.variations,
        input_audio: Optional[Path] = LoopInputs.input_audio,
        top_k: int = Inputs.top_k,
        top_p: float = Inputs.top_p,
        temperature: float = Inputs.temperature,
        classifier_free_guidance: int = Inputs.classifier_free_guidance,
        output_format: str = Inputs.output_format,
        seed: Optional[int] = Inputs.seed,
    ) -> List[Path]:
        inputs = dict(locals())
        del inputs["self"]
        request = self.loops.parse(**inputs)
        return [Path(p) for p in await _cancellable(self.loops.run, request)]


async def _cancellable(run, request):
    """``run(request, cancel)`` in a thread of its own; a cancelled prediction sets ``cancel``, and the
    service stops at its next decoding step."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(run, request, cancel)
    except asyncio.CancelledError:
        cancel.set()
        raise


def _inputs(scope: dict) -> dict:
    return {name: scope[name] for name in vars(Inputs) if not name.startswith("_")}
