"""The service behind ``predict.py``: setup once, then validated requests, several at a time.

Flow: settings -> weights folder (offline hub cache) -> models -> for each
request: validate (in the thread serving it) -> input audio -> conditions
(:meth:`Generator.prepare`) -> the LM's tokens from the scheduler, which batches
concurrent requests (:mod:`.batching`) -> decode -> normalize -> encode into a
fresh folder (:mod:`.outputs`). Everything after validation, and setup, runs in
the compute thread (:mod:`.compute`: why), the request's thread waits and logs.
Usable without Cog (tests, benchmarks, the command line).
"""
from __future__ import annotations

import queue
import threading
import time
import typing as tp
import uuid
from pathlib import Path

from ..audio import input_audio as audio_in, levels as audio_out
from . import folders as outputs
from . import compute
from .compute import relay
from ..core.logs import get_logger, timed
from ..generation.request import Request, parse_request
from ..core.settings import Settings

log = get_logger()


class Service:
    def __init__(self, settings: Settings, trained: tp.Optional[str] = None):
        """``trained``: a trained file, a folder holding one, or its URL, served on top of the model
        (``setup(weights=...)``; None: ``settings.trained``, MUSICGEN_TRAINED)."""
        start = time.perf_counter()
        self.settings = settings
        self.trained_source = trained or settings.trained
        # every torch call of the service runs in this one thread, setup's too (why: .compute)
        self.compute = compute.shared()
        self.compute.call(self._load, settings)
        removed = outputs.remove_orphans()
        if removed:
            log.info("removed %d output folder(s) left by a process that no longer runs", removed)
        outputs.remove_all_at_exit()
        log.info("ready: %s, %d channel(s), %d Hz, %.0f s window; setup took %.2f s",
                 settings.model, self.model.audio_channels, self.model.sample_rate,
                 self.model.max_duration, time.perf_counter() - start)

    def _load(self, settings: Settings) -> None:
        from ..weights import loading
        from .scheduler import Scheduler
        from ..generation.generator import Generator

        device = settings.resolved_device()
        log.info("weights: %s; model: %s; device: %s", settings.weights_dir, settings.model, device)
        with timed("imported torch", log):
            import torch  # noqa: F401
        rows = 2 * settings.concurrency
        self.trained = self._trained(settings)  # checked against the model before anything loads
        cache, key = self._prepared_cache(settings, device, rows, self.trained)
        # a prepared decoder's files are read and hashed in the background while audiocraft imports;
        # loading then leaves the LM matrices it holds unread
        pending = cache.start(key) if cache is not None else None
        self.model = loading.load_musicgen(settings, device, skip=pending.skips if pending else None)
        entry = pending.entry() if pending else None
        if self.trained is not None:
            from ..weights import trained

            trained.apply(self.trained, self.model.lm)
        self.mbd = loading.MBDSource(settings, device)
        self.generator = Generator(self.model, settings.decoder, rows=rows, prepared=entry)
        if cache is not None and entry is None and self.generator.decoder.runner is not None:
            cache.store(key, self.generator.decoder)
        freed = self.generator.decoder.release_stock_weights()
        if freed:
            log.info("released the LM's %s weights kept in %s instead: %.0f MB", self.model.lm.emb[0].weight.dtype,
                     self.generator.decoder.mode, freed / 1e6)
        self.capabilities = self.generator.capabilities(settings.max_duration, self.mbd.unavailable())
        if device.startswith("cuda"):
            self._warm_up()
        self.scheduler = Scheduler(self.generator, settings.concurrency, self.compute)
        log.info("concurrency: %d; %s", settings.concurrency, self.scheduler.describe())

    def _trained(self, settings: Settings) -> tp.Any:
        """The trained file to serve (None: none), resolved (a URL is downloaded, by content) and
        checked against the served model: another base is refused here, before any model loads."""
        if not self.trained_source:
            return None
        from ..weights import trained, hub as weights

        path = None
        for folder in settings.trained_dirs:  # downloads go to the first folder that can be written
            try:
                path = trained.resolve(self.trained_source, folder)
                break
            except OSError as exc:
                log.info("trained weights: cannot use %s (%s)", folder, exc.strerror or exc)
        if path is None:
            raise trained.TrainedError(f"trained weights: no writable folder to download into "
                                       f"({', '.join(map(str, settings.trained_dirs))})")
        t = trained.Trained(path)
        checkpoint = weights.musicgen_folder(settings.weights_dir, settings.model) / weights.LM_FILE
        trained.check_base(t, settings.model, weights.checkpoint_identity(checkpoint))
        # the whole file against the checkpoint's shapes (read from its header, not its weights)
        trained.validate(t, {name: tuple(v.shape) for name, v in weights.map_checkpoint(checkpoint)["best_state"].items()})
        log.info("trained weights: %s", t.describe())
        return t

    @staticmethod
    def _prepared_cache(settings: Settings, device: str, rows: int, trained: tp.Any = None) -> tp.Tuple[tp.Any, tp.Any]:
        """The prepared-decoder cache for this setup and its key (None, None where setups do not use
        one: GPUs, exact, stock, MUSICGEN_PREPARED=off); a trained file's identity is part of the key."""
        from ..weights import hub as weights
        from ..decoding import ALIASES, store as prepared

        decoder = ALIASES.get(settings.decoder, settings.decoder)
        if not prepared.applies(decoder, device) or not settings.prepared_dirs:
            return None, None
        checkpoint = weights.musicgen_folder(settings.weights_dir, settings.model) / weights.LM_FILE
        adapter = None if trained is None else weights.checkpoint_identity(trained.path)
        return prepared.Cache(settings.prepared_dirs, int(settings.prepared_max_gb * 1e9)), prepared.key(weights.checkpoint_identity(checkpoint),
                                                                    decoder, rows, adapter)

    def _warm_up(self) -> None:
        """One short generation at setup, on GPUs: the first use of each CUDA kernel (module loading,
        cuBLAS workspaces, T5's and EnCodec's first calls) costs about a second and a half once per
        process (H200: the first 8 s request took 3.5 s, the next ones 1.8 s, of which 0.4 s was
        recording the step's CUDA graph), and that cost belongs in setup, not in a user's request."""
        start = time.perf_counter()
        self.generator.generate(self.parse(prompt="warm-up", duration=1, seed=0))
        log.info("warm-up generation: %.2f s", time.perf_counter() - start)

    def parse(self, **inputs: tp.Any) -> Request:
        return parse_request(self.capabilities, **inputs)

    def run(self, request: Request, cancel: tp.Optional[threading.Event] = None) -> Path:
        """Generate and write the audio file for a valid request; returns its path. Thread-safe:
        each call is one prediction; ``cancel`` (set from elsewhere) stops it at the next step with
        :class:`~.errors.Cancelled`."""
        outputs.remove_expired()
        log.info("model: %s; mode: %s; duration: %d s; top_k=%d top_p=%g temperature=%g "
                 "classifier_free_guidance=%d", self.settings.model, request.mode, request.duration,
                 request.top_k, request.top_p, request.temperature, request.classifier_free_guidance)
        lines: "queue.SimpleQueue[str]" = queue.SimpleQueue()  # this request's lines from the compute thread
        if not self.scheduler.batching:  # GPUs, and precisions that do not batch: one request at a time
            return self.compute.call(self._alone, request, cancel, lines=lines)
        prepared = self.compute.call(self._prepare, request, lines=lines)
        prepared.say = lines.put
        tokens = relay(self.scheduler.submit(prepared, cancel), lines)
        return self.compute.call(self._finish, request, tokens, lines=lines)

    # the pieces of a request, in the compute thread

    def _alone(self, request: Request, cancel: tp.Optional[threading.Event]) -> Path:
        prepared = self.generator.prepare(request, self.input_clip(request))
        tokens = self.generator.tokens(prepared, cancelled=None if cancel is None else cancel.is_set)
        return self._finish(request, tokens)

    def _prepare(self, request: Request) -> tp.Any:
        return self.generator.prepare(request, self.input_clip(request), tensors=True)

    def _finish(self, request: Request, tokens: tp.Any) -> Path:
        mbd = self.mbd_decoder() if request.multi_band_diffusion else None
        wav = self.generator.decode(tokens, mbd)[0].float().cpu()
        start = time.perf_counter()
        sample_rate = self.model.sample_rate
        wav = audio_out.normalize(wav, sample_rate, request.normalization_strategy)
        folder = outputs.fresh_folder()
        try:
            with outputs.held(folder):
                # a unique name: uploads (`--upload-url`) of different predictions never collide
                path = audio_out.write(wav, sample_rate, request.output_format, folder,
                                       stem=f"musicgen-{uuid.uuid4().hex[:12]}")
        except BaseException:
            outputs.remove_folder(folder)
            raise
        log.info("normalized (%s) and wrote %s in %.2f s", request.normalization_strategy,
                 path.name, time.perf_counter() - start)
        return path

    def stream(self, request: Request, cancel: tp.Optional[threading.Event] = None) -> tp.Iterator[Path]:
        """The streaming model's prediction: yields each chunk file as its audio is generated
        (:mod:`.streaming`), then the whole file, which is what :meth:`run` returns for the same
        request. A failure after some chunks raises (no final file); a cancel stops at the next step."""
        from ..core.errors import InputError

        if request.multi_band_diffusion:
            raise InputError([("multi_band_diffusion", "the streaming model decodes with EnCodec as it generates; "
                               "MultiBand Diffusion renders whole 30 s windows at the end: use the main model")])
        outputs.remove_expired()
        log.info("model: %s; mode: %s; duration: %d s; streaming", self.settings.model, request.mode, request.duration)
        cancel = cancel or threading.Event()
        items: "queue.SimpleQueue[Path]" = queue.SimpleQueue()
        lines: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        future = self.compute.post(lambda: self._stream(request, cancel, items.put), say=lines.put)
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

    def _stream(self, request: Request, cancel: threading.Event, emit: tp.Callable[[Path], None]) -> None:
        import torch
        from .streaming import ChunkStream

        prepared = self.generator.prepare(request, self.input_clip(request))
        head = None
        if prepared.context is not None:  # a continuation: its audio comes first
            parts = [p for p in (prepared.head, prepared.context) if p is not None and p.shape[-1]]
            head = torch.cat(parts, dim=-1) if parts else None
        with outputs.held(outputs.fresh_folder()) as folder:  # (a stream may outlast the keep period)
            chunks = ChunkStream(self.model, request.normalization_strategy, request.output_format, folder, emit, head)
            tokens = self.generator.tokens(prepared, cancelled=cancel.is_set, stream=chunks)
            chunks.finish(tokens)
        log.info("streaming: %d chunk(s), the first after %.2f s", chunks.index, chunks.first_chunk_at or 0.0)
        emit(self._finish(request, tokens))

    def mbd_decoder(self) -> tp.Any:
        """The MBD decoder (loaded on first use when lazy), checked against this model's tokens."""
        from ..audio.mbd import check_compatible

        mbd = self.mbd.get()
        check_compatible(mbd, self.model.compression_model)
        return mbd

    def input_clip(self, request: Request) -> tp.Optional[audio_in.Clip]:
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
        clip = audio_in.load(request.input_audio, self.model.sample_rate, self.model.audio_channels,
                             start=request.continuation_start, end=end)
        log.info("input_audio: using %.1f s to %.1f s (%s), decoded in %.2f s", clip.start,
                 clip.start + clip.seconds, "melody" if request.mode == "melody" else "continued",
                 time.perf_counter() - start)
        if request.continuation_end is not None and clip.file_seconds is not None \
                and request.continuation_end > clip.file_seconds:
            log.info("continuation_end (%d s) is past the end of input_audio (%.1f s long): "
                     "using the audio up to its end", request.continuation_end, clip.file_seconds)
        return clip

    def predict(self, cancel: tp.Optional[threading.Event] = None, **inputs: tp.Any) -> Path:
        return self.run(self.parse(**inputs), cancel)
