"""The loop model behind ``predict.py:LoopPredictor``: loops of whole bars at an exact tempo, each
seamless when repeated, and variations that continue the first.

1. **The first loop**: the main model's request with the tempo in the prompt's words
   (:meth:`..generation.request.LoopRequest.generation`), a little longer than the loop
   (:func:`..audio.looping.generation_seconds`); its beats and downbeats found
   (:mod:`..audio.beats`), a span of whole bars cut on a downbeat, stretched to the exact tempo and
   seamed (:mod:`..audio.looping`). Without a usable tempo the next seed is tried
   (:data:`TRIES` in all, logged), then the exact length is cut at the asked tempo from the start.
2. **Variations** continue the first loop's last bar (a continuation request each, with a seed of
   its own), so that each starts where the first loop ends; they are submitted together, so where the
   decoder shares steps (:attr:`..decoding.Decoder.shares_steps`) they decode as rows of one batch,
   else one after another (logged). Each is tracked, cut and seamed as the first, from the bar after
   that prompt.
3. Every loop is levelled with the main model's ``loudness`` strategy and written as
   ``loop-<index>-<bpm>bpm.<format>`` into one fresh folder; nothing is returned unless all are.

The negative prompt conditions guidance's unconditional branch (:mod:`..decoding.loop`).
"""

from __future__ import annotations

import random
import threading
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..audio import beats as beat_tracking
from ..audio import looping, output_audio
from ..core import folders
from ..core.errors import Cancelled
from ..core.limits import MAX_SEED
from ..core.logs import get_logger
from ..core.settings import Settings
from ..generation.request import LoopRequest, Request, parse_loop_request
from ..generation.seeding import random_seed
from .service import Service

log = get_logger()

TRIES = 2  # seeds tried for a loop before its exact length is cut without a tempo
# Requests decoded together: the variations after the first loop (3 by default; up to 7 run as
# 4, then the rest as rows free up). Sets the decoder's format for that load (`auto` measures at it).
SLOTS = 4


@dataclass
class Made:
    """One loop as made, for the logs and the benchmark."""

    index: int
    seed: int
    tries: int
    found_bpm: tp.Optional[float]
    start: float
    stretch: float
    post_s: float  # tracking, cutting, stretching and the seam


@dataclass
class Report:
    generation_s: tp.List[float] = field(default_factory=list)  # per round of generation
    loops: tp.List[Made] = field(default_factory=list)


class LoopService:
    def __init__(self, settings: Settings, trained: tp.Optional[str] = None, tries: int = TRIES, together: bool = True):
        """``tries``: seeds tried per loop (:data:`TRIES`); ``together``: variations submitted
        together (False: one after another, as the anchor makes them; for the benchmark)."""
        self.tries = max(1, tries)
        self.together = together
        self.service = Service(replace(settings, requests_per_prediction=SLOTS), trained=trained)
        self.sample_rate = self.service.model.sample_rate
        self.report = Report()
        start = time.perf_counter()
        # the tracker's first call compiles librosa's numba kernels (seconds): in setup, not a request
        beat_tracking.track(np.zeros((1, self.sample_rate), np.float32) + 1e-3, self.sample_rate, 120.0, 4)
        log.info("loop model ready (beat tracker warmed up in %.2f s)", time.perf_counter() - start)

    def parse(self, **inputs: tp.Any) -> LoopRequest:
        return parse_loop_request(self.service.capabilities, **inputs)

    def predict(self, cancel: tp.Optional[threading.Event] = None, **inputs: tp.Any) -> tp.List[Path]:
        return self.run(self.parse(**inputs), cancel)

    def run(self, request: LoopRequest, cancel: tp.Optional[threading.Event] = None) -> tp.List[Path]:
        """The loop files of a valid request, in order; ``cancel`` stops at the next decoding step."""
        cancel = cancel or threading.Event()
        folders.remove_expired()
        seed = request.seed if request.seed is not None else random_seed()
        log.info(
            "loop model: %s; %d bar(s) of %d at %g BPM (%.3f s), %d variation(s); seed %d%s%s",
            self.service.settings.model,
            request.bars,
            request.beats_per_bar,
            request.bpm,
            request.seconds,
            request.variations,
            seed,
            "" if request.seed is not None else " (random)",
            f"; negative prompt: {request.negative_prompt!r}" if request.negative_prompt else "",
        )
        self.report = Report()
        folder = folders.fresh_folder()
        try:
            with folders.held(folder):
                loops = self._first(request, seed, cancel)
                if request.variations > 1:
                    prompt = self._prompt_file(request, loops[0], folder)
                    loops += self._variations(request, seed, prompt, cancel)
                    prompt.unlink()
                return [self._write(request, i, wav, folder) for i, wav in enumerate(loops)]
        except BaseException:
            folders.remove_folder(folder)
            raise

    # ------------------------------------------------------------------ the steps

    def _first(self, request: LoopRequest, seed: int, cancel: threading.Event) -> tp.List[np.ndarray]:
        seconds = looping.generation_seconds(request.bpm, request.bars, request.beats_per_bar)
        return self._loops(request, [(0, seed)], seconds, None, cancel)

    def _variations(
        self, request: LoopRequest, seed: int, prompt: Path, cancel: threading.Event
    ) -> tp.List[np.ndarray]:
        if not self.service.scheduler.batching:
            log.info(
                "variations: decoded one after another (decoder %s does not share steps)",
                self.service.generator.decoder.mode,
            )
        seconds = looping.generation_seconds(request.bpm, request.bars, request.beats_per_bar, continuing=True)
        rows = [(i, variation_seed(seed, i)) for i in range(1, request.variations)]
        return self._loops(request, rows, seconds, prompt, cancel)

    def _loops(
        self,
        request: LoopRequest,
        rows: tp.List[tp.Tuple[int, int]],
        seconds: int,
        prompt: tp.Optional[Path],
        cancel: threading.Event,
    ) -> tp.List[np.ndarray]:
        """Loops for ``rows`` ((index, seed) each), generated together: each one whose audio has no
        usable tempo is generated again with its next seed, up to :data:`TRIES`, then cut without one."""
        earliest = 0.0 if prompt is None else self._prompt_seconds(request)
        done: tp.Dict[int, np.ndarray] = {}
        pending = list(rows)
        for attempt in range(self.tries):
            requests = [request.generation(seconds, (s + attempt) % (MAX_SEED + 1), prompt) for _, s in pending]
            audios = self._generate(requests, cancel)
            last = attempt == self.tries - 1
            retry = []
            for (index, first_seed), req, wav in zip(pending, requests, audios):
                start = time.perf_counter()
                found = beat_tracking.track(wav, self.sample_rate, request.bpm, request.beats_per_bar)
                loop = (
                    None
                    if found is None
                    else looping.cut(wav, self.sample_rate, found, request.bpm, request.bars, earliest)
                )
                what = "" if found is None else f" (found {found.bpm:.1f} BPM, contrast {found.contrast:.1f})"
                if loop is None and not last:
                    log.info(
                        "loop %d: no usable tempo near %g BPM in seed %d's audio%s: trying seed %d",
                        index, request.bpm, req.seed, what, (first_seed + attempt + 1) % (MAX_SEED + 1),
                    )  # fmt: skip
                    retry.append((index, first_seed))
                    continue
                if loop is None:
                    loop = looping.fallback(
                        wav, self.sample_rate, request.bpm, request.bars, request.beats_per_bar, earliest
                    )
                    log.info(
                        "loop %d: no usable tempo after %d seed(s)%s: cut %.3f s at %g BPM from %.2f s, not stretched",
                        index, self.tries, what, request.seconds, request.bpm, loop.start,
                    )  # fmt: skip
                else:
                    log.info(
                        "loop %d (seed %d): %.1f BPM found, first downbeat at %.2f s, stretched x%.4f to %g BPM",
                        index, req.seed, loop.found_bpm, loop.start, loop.stretch, request.bpm,
                    )  # fmt: skip
                post = time.perf_counter() - start
                self.report.loops.append(
                    Made(index, tp.cast(int, req.seed), attempt + 1, loop.found_bpm, loop.start, loop.stretch, post)
                )
                done[index] = loop.wav
            pending = retry
            if not pending:
                break
        return [done[index] for index, _ in rows]

    def _generate(self, requests: tp.List[Request], cancel: threading.Event) -> tp.List[np.ndarray]:
        """The audio of each request, [C, T] float32, submitted together (they share decoding steps
        where the decoder allows); a failure or a cancel stops the others at their next step."""
        start = time.perf_counter()

        def one(req: Request) -> np.ndarray:
            try:
                return self.service.audio(req, cancel).numpy()
            except BaseException:
                cancel.set()
                raise

        if len(requests) == 1 or not self.together:
            audios = [one(req) for req in requests]
        else:
            with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="loop-row") as pool:
                futures = [pool.submit(one, req) for req in requests]
                audios = [f.result() for f in futures]
        if cancel.is_set():
            raise Cancelled()
        seconds = time.perf_counter() - start
        self.report.generation_s.append(seconds)
        log.info("generated %d loop(s) of audio in %.2f s", len(requests), seconds)
        return audios

    def _prompt_seconds(self, request: LoopRequest) -> float:
        """The variations' prompt: the first loop's last bar (all of it when it is one bar)."""
        return request.beats_per_bar * 60.0 / request.bpm

    def _prompt_file(self, request: LoopRequest, first: np.ndarray, folder: Path) -> Path:
        """The first loop's last bar as a float WAV file, the variations' continuation input."""
        import soundfile

        n = min(first.shape[-1], int(round(self._prompt_seconds(request) * self.sample_rate)))
        path = folder / "prompt.wav"
        soundfile.write(str(path), first[:, -n:].T, self.sample_rate, subtype="FLOAT")
        return path

    def _write(self, request: LoopRequest, index: int, wav: np.ndarray, folder: Path) -> Path:
        import torch

        levelled = output_audio.normalize(torch.from_numpy(wav), self.sample_rate, "loudness")
        return output_audio.write(
            levelled, self.sample_rate, request.output_format, folder, stem=f"loop-{index}-{request.bpm:g}bpm"
        )


def variation_seed(seed: int, index: int) -> int:
    """Variation ``index``'s first seed: drawn from the request's seed, so each variation has its own
    and the same request gives the same loops."""
    return random.Random(seed * 1009 + index).randrange(MAX_SEED + 1)
