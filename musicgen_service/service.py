"""The service behind ``predict.py``: setup once, then one validated request at a time.

Flow: settings -> weights folder (offline hub cache) -> models -> for each
request: validate -> generate -> normalize -> encode into a fresh folder.
Usable without Cog (tests, benchmarks, the command line).
"""
from __future__ import annotations

import time
import typing as tp
from pathlib import Path

from . import audio_out
from .logs import get_logger
from .request import Request, parse_request
from .settings import Settings

log = get_logger()


class Service:
    def __init__(self, settings: Settings):
        start = time.perf_counter()
        self.settings = settings
        from . import loading
        from .generate import Generator

        device = settings.resolved_device()
        log.info("weights: %s; model: %s; device: %s", settings.weights_dir, settings.model, device)
        self.model = loading.load_musicgen(settings, device)
        self.mbd = loading.MBDSource(settings, device)
        self.generator = Generator(self.model, self.mbd)
        self.capabilities = self.generator.capabilities(settings.max_duration)
        self._last_output: tp.Optional[Path] = None
        log.info("ready: %s, %d channel(s), %d Hz, %.0f s window; setup took %.2f s",
                 settings.model, self.model.audio_channels, self.model.sample_rate,
                 self.model.max_duration, time.perf_counter() - start)

    def parse(self, **inputs: tp.Any) -> Request:
        return parse_request(self.capabilities, **inputs)

    def run(self, request: Request) -> Path:
        """Generate and write the audio file for a valid request; returns its path."""
        # The previous prediction's file has been delivered by now: drop it.
        audio_out.remove_folder(self._last_output)
        self._last_output = None
        log.info("model: %s; mode: %s; duration: %d s; top_k=%d top_p=%g temperature=%g "
                 "classifier_free_guidance=%d", self.settings.model, request.mode, request.duration,
                 request.top_k, request.top_p, request.temperature, request.classifier_free_guidance)
        generated = self.generator.generate(request)
        start = time.perf_counter()
        wav = audio_out.normalize(generated.wav, generated.sample_rate, request.normalization_strategy)
        folder = audio_out.fresh_folder()
        try:
            path = audio_out.write(wav, generated.sample_rate, request.output_format, folder)
        except BaseException:
            audio_out.remove_folder(folder)
            raise
        self._last_output = folder
        log.info("normalized (%s) and wrote %s in %.2f s", request.normalization_strategy,
                 path.name, time.perf_counter() - start)
        return path

    def predict(self, **inputs: tp.Any) -> Path:
        return self.run(self.parse(**inputs))
