"""Cog entry point: the public input schema of the model, and nothing else of substance.

Names, order, types, defaults, enums and descriptions are the model page's
(14 inputs, one ``uri`` output). Every rule is checked, with a message naming
the field, in ``musicgen_service.request``; the work happens in
``musicgen_service.service``.

`cog build` (Cog >= 0.23) reads this file without running it (a static parser,
replicate/cog pkg/schema/python): every ``Input()`` argument is written as a plain
literal (one string per description, literal lists and numbers), since imported
names, ``list(X)`` and implicitly joined strings are not resolved there. A test keeps
these literals equal to ``musicgen_service.request``'s rules.

``predict`` is async, as Cog requires for ``concurrency.max`` > 1 (cog.yaml): each
prediction waits for the service in a thread of its own (the service does its
torch work in its one compute thread), the service's scheduler lets concurrent
predictions share the LM's decoding steps, and a cancelled prediction stops at
the next step.
"""
import asyncio
import threading
from typing import Optional

from cog import BasePredictor, Input, Path


class Predictor(BasePredictor):
    def setup(self, weights: Optional[Path] = None) -> None:
        """``weights``: a trained version's weights (Cog passes ``COG_WEIGHTS``: a path or URL of a file
        made by ``cog train`` / ``script/train``), served on top of the base model."""
        from musicgen_service.service import Service
        from musicgen_service.settings import Settings

        self.service = Service(Settings.from_env(), trained=str(weights) if weights else None)

    async def predict(
        self,
        prompt: Optional[str] = Input(
            description="A description of the music you want to generate.", default=None),
        input_audio: Optional[Path] = Input(
            description="An audio file that will influence the generated music. If `continuation` is `True`, the generated music will be a continuation of the audio file. Otherwise, the generated music will mimic the audio file's melody.",
            default=None),
        duration: int = Input(
            description="Duration of the generated audio in seconds.", default=8, ge=1),
        continuation: bool = Input(
            description="If `True`, generated music will continue `melody`. Otherwise, generated music will mimic `audio_input`'s melody.",
            default=False),
        continuation_start: int = Input(
            description="Start time of the audio file to use for continuation.", default=0, ge=0),
        continuation_end: Optional[int] = Input(
            description="End time of the audio file to use for continuation. If -1 or None, will default to the end of the audio clip.",
            default=None, ge=-1),
        multi_band_diffusion: bool = Input(
            description="If `True`, the EnCodec tokens will be decoded with MultiBand Diffusion. Only works with non-stereo models.",
            default=False),
        normalization_strategy: str = Input(
            description="Strategy for normalizing audio.", default="loudness",
            choices=["loudness", "clip", "peak", "rms"]),
        top_k: int = Input(
            description="Reduces sampling to the k most likely tokens.", default=250, ge=0),
        top_p: float = Input(
            description="Reduces sampling to tokens with cumulative probability of p. When set to `0` (default), top_k sampling is used.",
            default=0.0, ge=0.0, le=1.0),
        temperature: float = Input(
            description="Controls the 'conservativeness' of the sampling process. Higher temperature means more diversity.",
            default=1.0, ge=0.0),
        classifier_free_guidance: int = Input(
            description="Increases the influence of inputs on the output. Higher values produce lower-varience outputs that adhere more closely to inputs.",
            default=3, ge=0),
        output_format: str = Input(
            description="Output format for generated audio.", default="wav",
            choices=["wav", "mp3"]),
        seed: Optional[int] = Input(
            description="Seed for random number generator. If None or -1, a random seed will be used.",
            default=None, ge=-1, le=4294967295),
    ) -> Path:
        request = self.service.parse(
            prompt=prompt, input_audio=input_audio, duration=duration, continuation=continuation,
            continuation_start=continuation_start, continuation_end=continuation_end,
            multi_band_diffusion=multi_band_diffusion, normalization_strategy=normalization_strategy,
            top_k=top_k, top_p=top_p, temperature=temperature,
            classifier_free_guidance=classifier_free_guidance, output_format=output_format, seed=seed)
        cancel = threading.Event()
        try:
            return Path(await asyncio.to_thread(self.service.run, request, cancel))
        except asyncio.CancelledError:
            cancel.set()
            raise
