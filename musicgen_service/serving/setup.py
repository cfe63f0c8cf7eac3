"""Setup, the one place that composes the service: settings -> weights -> model -> trained file ->
decoder -> scheduler. Runs in the compute thread (:mod:`.compute`), once per service.

1. the device and the rows a decoding step takes at full load (2 per request sharing it:
   :attr:`..core.settings.Settings.slots`);
2. the trained file to serve (a path or URL: :mod:`..weights.fetch`), checked against the base
   checkpoint before anything loads (:mod:`..weights.trained`);
3. the prepared decoder for this checkpoint, trained file, machine and settings, read in the
   background while audiocraft imports (:mod:`..decoding.prepared`);
4. the model (:mod:`..weights.loading`), the trained weights applied, MultiBand Diffusion's source;
5. the decoder (:class:`..generation.generator.Generator`), stored for the next boot when it was
   measured and converted here; the LM's own copies of matrices the decoder keeps released;
6. what requests may ask of this model (:class:`..generation.request.Capabilities`) and the scheduler
   that lets concurrent requests share decoding steps (:mod:`.scheduler`).
"""

from __future__ import annotations

import threading
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import TrainedError
from ..core.logs import get_logger, timed
from ..core.settings import Settings
from ..generation.generator import Generator
from ..generation.request import Capabilities
from ..weights import hub, loading
from ..weights import trained as trained_files
from .scheduler import Scheduler

if tp.TYPE_CHECKING:
    from audiocraft.models import MultiBandDiffusion, MusicGen

    from ..decoding import prepared
    from .compute import ComputeThread

log = get_logger()


@dataclass
class Loaded:
    """What setup made: everything a request runs on."""

    device: str
    model: "MusicGen"
    trained: tp.Optional[trained_files.Trained]
    mbd: "MBDSource"
    generator: Generator
    capabilities: Capabilities
    scheduler: Scheduler


def setup(settings: Settings, trained_source: tp.Optional[str], compute: "ComputeThread") -> Loaded:
    """Compose the service (see the module docstring); ``trained_source``: a trained file, a folder
    holding one, or a URL (None: none)."""
    device = settings.resolved_device()
    log.info("weights: %s; model: %s; device: %s", settings.weights_dir, settings.model, device)
    with timed("imported torch", log):
        import torch  # noqa: F401
    rows = 2 * settings.slots
    trained = trained_file(settings, trained_source)  # checked against the model before anything loads
    cache, key = decoder_cache(settings, device, rows, trained)
    # a prepared decoder's files are read and hashed in the background while audiocraft imports;
    # loading then leaves the LM matrices it holds unread
    pending = cache.start(key) if cache is not None and key is not None else None
    model = loading.load_musicgen(settings.weights_dir, settings.model, device, skip=pending.skips if pending else None)
    entry = pending.entry() if pending else None
    if trained is not None:
        trained_files.apply(trained, model.lm)
    mbd = MBDSource(settings, device)
    generator = Generator(model, settings.decoder, rows=rows, prepared=entry)
    if cache is not None and key is not None and entry is None and generator.decoder.runner is not None:
        cache.store(key, generator.decoder)
    freed = generator.decoder.release_stock_weights()
    if freed:
        log.info(
            "released the LM's %s weights kept in %s instead: %.0f MB",
            model.lm.emb[0].weight.dtype,
            generator.decoder.mode,
            freed / 1e6,
        )
    capabilities = generator.capabilities(settings.max_duration, mbd.unavailable())
    scheduler = Scheduler(generator, settings.slots, compute)
    log.info("concurrency: %d; %s", settings.concurrency, scheduler.describe())
    return Loaded(
        device=device,
        model=model,
        trained=trained,
        mbd=mbd,
        generator=generator,
        capabilities=capabilities,
        scheduler=scheduler,
    )


def trained_file(settings: Settings, source: tp.Optional[str]) -> tp.Optional[trained_files.Trained]:
    """The trained file to serve (None: none), resolved (a URL is downloaded, by content) and checked
    against the served model: another base, or a file that does not fit it, is refused here, before
    any model loads."""
    if not source:
        return None
    from ..weights import fetch

    path = None
    for folder in settings.trained_dirs:  # downloads go to the first folder that can be written
        try:
            path = fetch.resolve(source, folder)
            break
        except OSError as exc:
            log.info("trained weights: cannot use %s (%s)", folder, exc.strerror or exc)
    if path is None:
        raise TrainedError(
            f"trained weights: no writable folder to download into ({', '.join(map(str, settings.trained_dirs))})"
        )
    t = trained_files.Trained(path)
    checkpoint = hub.musicgen_folder(settings.weights_dir, settings.model) / hub.LM_FILE
    trained_files.check_base(t, settings.model, hub.checkpoint_identity(checkpoint))
    # the whole file against the checkpoint's shapes (read from its header, not its weights)
    trained_files.validate(
        t, {name: tuple(v.shape) for name, v in hub.map_checkpoint(checkpoint)["best_state"].items()}
    )
    log.info("trained weights: %s", t.describe())
    return t


def decoder_cache(
    settings: Settings, device: str, rows: int, trained: tp.Optional[trained_files.Trained] = None
) -> tp.Tuple[tp.Optional["prepared.Cache"], tp.Optional[tp.Dict[str, tp.Any]]]:
    """The prepared-decoder cache for this setup and its key (None, None where setups do not use
    one: GPUs, exact, stock, MUSICGEN_PREPARED=off); a trained file's identity is part of the key."""
    from ..decoding import ALIASES, prepared

    decoder = ALIASES.get(settings.decoder, settings.decoder)
    if not prepared.applies(decoder, device) or not settings.prepared_dirs:
        return None, None
    checkpoint = hub.musicgen_folder(settings.weights_dir, settings.model) / hub.LM_FILE
    adapter = None if trained is None else hub.checkpoint_identity(trained.path)
    return (
        prepared.Cache(settings.prepared_dirs, int(settings.prepared_max_gb * 1e9)),
        prepared.key(hub.checkpoint_identity(checkpoint), decoder, rows, adapter),
    )


class MBDSource:
    """Hands out the MBD decoder, loading it once: in setup (eager) or on first use (lazy)."""

    def __init__(self, settings: Settings, device: str):
        self._weights_dir: Path = settings.weights_dir
        self._mode = settings.mbd
        self._device = device
        self._mbd: tp.Optional["MultiBandDiffusion"] = None
        self._lock = threading.Lock()
        if self._mode == "eager":
            self._mbd = loading.load_mbd(self._weights_dir, device)

    def unavailable(self) -> tp.Optional[str]:
        """Why a request can't use MBD on this deployment (None: it can)."""
        if self._mode == "off":
            return "MultiBand Diffusion is turned off on this deployment (MUSICGEN_MBD=off)"
        missing = [f for f in hub.mbd_files() if hub.cached_file(self._weights_dir, f) is None]
        if missing:
            return (
                f"MultiBand Diffusion is not installed here: {', '.join(map(str, missing))} is missing "
                f"from the weights folder (`{hub.DOWNLOAD_COMMAND}` fetches it)"
            )
        return None

    def get(self) -> "MultiBandDiffusion":
        reason = self.unavailable()
        if reason:
            raise RuntimeError(reason)
        with self._lock:
            if self._mbd is None:
                self._mbd = loading.load_mbd(self._weights_dir, self._device)
            return self._mbd
