"""The service behind ``predict.py``: setup once, then validated requests, several at a time.

Flow: setup (:mod:`.setup`: settings -> weights -> model -> trained file -> decoder -> scheduler), then
for each request: validate (in the thread serving it: :meth:`Service.parse`) -> the request's steps,
each defined once and run in the compute thread (:mod:`.compute`: why):

1. **condition** (:meth:`Service._condition`): input audio, the seed, the conditions (T5, chroma), a
   continuation's prompt tokens;
2. **tokens**, from one of three sources: the scheduler, where concurrent requests share decoding
   steps (:mod:`.scheduler`); alone (GPUs, precisions that do not batch); or alone while a chunk stream
   follows them (:mod:`.streaming`);
3. **finish** (:meth:`Service._finish`): audio from the tokens (EnCodec or MBD), levelled, encoded
   into a fresh folder (:mod:`..core.folders`).

The request's own thread waits and logs. Usable without Cog (tests, benchmarks, the command line).
"""

from __future__ import annotations

import queue
import threading
import time
import typing as tp
import uuid
from pathlib import Path

from ..audio import input_audio, output_audio
from ..core import folders
from ..core.errors import InputError
from ..core.logs import get_logger
from ..core.settings import Settings
from ..generation.request import Request, parse_request
from . import compute
from .compute import relay
from .setup import setup

if tp.TYPE_CHECKING:
    import torch
    from audiocraft.models import MultiBandDiffusion

    from ..generation.generator import Conditioned

log = get_logger()
T = tp.TypeVar("T")


class Service:
    def __init__(self, settings: Settings, trained: tp.Optional[str] = None):
        """``trained``: a trained file, a folder holding one, or its URL, served on top of the model
        (``setup(weights=...)``; None: ``settings.trained``, MUSICGEN_TRAINED)."""
        start = time.perf_counter()
        self.settings = settings
        self.trained_source = trained or settings.trained
        # every torch call of the service runs in this one thread, setup's too (why: .compute)
        self.compute = compute.shared()
        loaded = self.compute.call(setup, settings, self.trained_source, self.compute)
        self.device = loaded.device
        self.model = loaded.model
        self.trained = loaded.trained
        self.mbd = loaded.mbd
        self.generator = loaded.generator
        self.capabilities = loaded.capabilities
        self.scheduler = loaded.scheduler
        if self.device.startswith("cuda"):
            self._warm_up()
        removed = folders.remove_orphans()
        if removed:
            log.info("removed %d output folder(s) left by a process that no longer runs", removed)
        folders.remove_all_at_exit()
        log.info(
            "ready: %s, %d channel(s), %d Hz, %.0f s window; setup took %.2f s",
            settings.model,
            self.model.audio_channels,
            self.model.sample_rate,
            self.model.max_duration,
            time.perf_counter() - start,
        )

    def _warm_up(self) -> None:
        """One short request at setup, on GPUs: the first use of each CUDA kernel (module loading,
        cuBLAS workspaces, T5's and EnCodec's first calls, recording the step's CUDA graph) costs more
        than a whole short request, once per process (bench/results/gpu.json), and belongs in setup,
        not in a user's request."""
        start = time.perf_counter()
        path = self.compute.call(self._alone, self.parse(prompt="warm-up", duration=1, seed=0), None)
        folders.remove_folder(path.parent)
        log.info("warm-up generation: %.2f s", time.perf_counter() - start)

    def parse(self, **inputs: tp.Any) -> Request:
        return parse_request(self.capabilities, **inputs)

    def predict(self, cancel: tp.Optional[threading.Event] = None, **inputs: tp.Any) -> Path:
        return self.run(self.parse(**inputs), cancel)

    def run(self, request: Request, cancel: tp.Optional[threading.Event] = None) -> Path:
        """Generate and write the audio file for a valid request; returns its path. Thread-safe:
        each call is one prediction; ``cancel`` (set from elsewhere) stops it at the next step with
        :class:`~..core.errors.Cancelled`."""
        folders.remove_expired()
        log.info(
            "model: %s; mode: %s; duration: %d s; top_k=%d top_p=%g temperature=%g classifier_free_guidance=%d",
            self.settings.model,
            request.mode,
            request.duration,
            request.top_k,
            request.top_p,
            request.temperature,
            request.classifier_free_guidance,
        )
        return self._steps(request, cancel, self._finish)

    def audio(self, request: Request, cancel: tp.Optional[threading.Event] = None) -> "torch.Tensor":
        """The generated audio of a valid request, [C, T] float32 on the CPU, neither levelled nor
        written (the loop model cuts it first: :mod:`.loops`). Thread-safe as :meth:`run`: calls from
        several threads share decoding steps."""
        return self._steps(request, cancel, self._audio)

    def _steps(
        self, request: Request, cancel: tp.Optional[threading.Event], then: tp.Callable[[Request, "torch.Tensor"], T]
    ) -> T:
        """Conditions, tokens, then ``then(request, tokens)``, each in the compute thread."""
        lines: "queue.SimpleQueue[str]" = queue.SimpleQueue()  # this request's lines from the compute thread
        if not self.scheduler.batching:  # GPUs, and precisions that do not batch: the steps as one task
            return self.compute.call(lambda: then(request, self._tokens_alone(request, cancel)), lines=lines)
        conditioned = self.compute.call(self._condition, request, True, lines=lines)
        conditioned.say = lines.put
        tokens = relay(self.scheduler.submit(conditioned, cancel), lines)
        return self.compute.call(then, request, tokens, lines=lines)

    def stream(self, request: Request, cancel: tp.Optional[threading.Event] = None) -> tp.Iterator[Path]:
        """The streaming model's prediction: yields each chunk file as its audio is generated
        (:mod:`.streaming`), then the whole file, which is what :meth:`run` returns for the same
        request. A failure after some chunks raises (no final file); a cancel stops at the next step."""
        if request.multi_band_diffusion:
            raise InputError(
                [
                    (
                        "multi_band_diffusion",
                        "the streaming model decodes with EnCodec as it generates; "
                        "MultiBand Diffusion renders whole 30 s windows at the end: use the main model",
                    )
                ]
            )
        folders.remove_expired()
        log.info("model: %s; mode: %s; duration: %d s; streaming", self.settings.model, request.mode, request.duration)
        cancel = cancel or threading.Event()
        items: "queue.SimpleQueue[Path]" = queue.SimpleQueue()
        lines: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        future = self.compute.post(lambda: self._streamed(request, cancel, items.put), say=lines.put)
        try:
            while not future.done() or not items.empty() or not lines.empty():
                while not lines.empty():
                    log.info(lines.get())
                try:
                    yield items.get(timeout=0.02)
                except queue.Empty:
                    pass
            future.result()  # raises what the work raised (after the chunks already sent)
        except BaseException:
            cancel.set()  # (a cancel of the prediction arrives here as an exception in this thread)
            raise

    # ------------------------------------------------------------ a request's steps, in the compute thread

    def _condition(self, request: Request, tensors: bool = False) -> "Conditioned":
        """Step 1; ``tensors``: with the conditions' tensors, as a row sharing steps needs them."""
        return self.generator.condition(request, self.input_clip(request), tensors=tensors)

    def _alone(self, request: Request, cancel: tp.Optional[threading.Event]) -> Path:
        """The three steps, the tokens decoded alone."""
        return self._finish(request, self._tokens_alone(request, cancel))

    def _tokens_alone(self, request: Request, cancel: tp.Optional[threading.Event]) -> "torch.Tensor":
        """Steps 1 and 2, the tokens decoded alone."""
        conditioned = self._condition(request)
        return self.generator.tokens(conditioned, cancelled=None if cancel is None else cancel.is_set)

    def _streamed(self, request: Request, cancel: threading.Event, emit: tp.Callable[[Path], None]) -> None:
        """The three steps, the tokens decoded alone while a chunk stream follows them; ``emit`` gets
        each chunk file, then the whole file."""
        import torch

        from .streaming import ChunkStream

        conditioned = self._condition(request)
        head = None
        if conditioned.context is not None:  # a continuation: its audio comes first
            parts = [p for p in (conditioned.head, conditioned.context) if p is not None and p.shape[-1]]
            head = torch.cat(parts, dim=-1) if parts else None
        with folders.held(folders.fresh_folder()) as folder:  # (a stream may outlast the keep period)
            chunks = ChunkStream(self.model, request.normalization_strategy, request.output_format, folder, emit, head)
            tokens = self.generator.tokens(conditioned, cancelled=cancel.is_set, stream=chunks)
            chunks.finish(tokens)
        log.info("streaming: %d chunk(s), the first after %.2f s", chunks.index, chunks.first_chunk_at or 0.0)
        emit(self._finish(request, tokens))

    def _audio(self, request: Request, tokens: "torch.Tensor") -> "torch.Tensor":
        """Step 3's first half: the audio of the tokens (EnCodec, or MBD when asked), [C, T]."""
        mbd = self.mbd_decoder() if request.multi_band_diffusion else None
        return self.generator.to_audio(tokens, mbd)[0].float().cpu()

    def _finish(self, request: Request, tokens: "torch.Tensor") -> Path:
        """Step 3: the audio of the tokens, levelled and written into a fresh folder."""
        wav = self._audio(request, tokens)
        start = time.perf_counter()
        sample_rate = self.model.sample_rate
        wav = output_audio.normalize(wav, sample_rate, request.normalization_strategy)
        folder = folders.fresh_folder()
        try:
            with folders.held(folder):
                # a unique name: uploads (`--upload-url`) of different predictions never collide
                path = output_audio.write(
                    wav, sample_rate, request.output_format, folder, stem=f"musicgen-{uuid.uuid4().hex[:12]}"
                )
        except BaseException:
            folders.remove_folder(folder)
            raise
        log.info(
            "normalized (%s) and wrote %s in %.2f s",
            request.normalization_strategy,
            path.name,
            time.perf_counter() - start,
        )
        return path

    # ------------------------------------------------------------ what the steps use

    def mbd_decoder(self) -> "MultiBandDiffusion":
        """The MBD decoder (loaded on first use when lazy), checked against this model's tokens."""
        from ..audio.mbd import check_compatible

        mbd = self.mbd.get()
        check_compatible(mbd, self.model.compression_model)
        return mbd

    def input_clip(self, request: Request) -> tp.Optional[input_audio.Clip]:
        """The selected part of input_audio at the model's rate and channels (None without audio)."""
        if request.input_audio is None:
            return None
        start = time.perf_counter()
        end = request.continuation_end
        if request.mode == "melody":
            # Extension windows read the melody up to less than `duration + window` seconds in:
            # the rest of a long song would only cost stem separation time.
            needed = request.continuation_start + request.duration + self.model.max_duration
            end = needed if end is None else min(end, needed)
        clip = input_audio.load(
            request.input_audio,
            self.model.sample_rate,
            self.model.audio_channels,
            start=request.continuation_start,
            end=end,
        )
        log.info(
            "input_audio: using %.1f s to %.1f s (%s), decoded in %.2f s",
            clip.start,
            clip.start + clip.seconds,
            "melody" if request.mode == "melody" else "continued",
            time.perf_counter() - start,
        )
        if (
            request.continuation_end is not None
            and clip.file_seconds is not None
            and request.continuation_end > clip.file_seconds
        ):
            log.info(
                "continuation_end (%d s) is past the end of input_audio (%.1f s long): using the audio up to its end",
                request.continuation_end,
                clip.file_seconds,
            )
        return clip
