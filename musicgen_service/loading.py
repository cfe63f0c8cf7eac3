"""Building the models from the weights folder through audiocraft's own loaders.

- MusicGen: ``MusicGen.get_pretrained(<folder>)`` on the checkpoint folder that
  :mod:`.weights` resolved (a hub snapshot or a local fine-tune); its T5 and
  demucs conditioners load from the same hub cache, offline.
- MultiBand Diffusion: ``MultiBandDiffusion.get_mbd_musicgen``, with torch's safe
  loading kept on and only the omegaconf classes its checkpoint pickles allowed.
  Loaded in ``setup()`` (``MUSICGEN_MBD=eager``) or on first use (``lazy``).
"""
from __future__ import annotations

import collections
import logging
import threading
import typing as tp

from . import weights
from .logs import get_logger, timed
from .settings import Settings

log = get_logger()
# audiocraft imports xformers unconditionally but runs its 'torch' attention backend; xformers' warning
# that its own compiled kernels don't match this torch build is noise on the prediction page.
logging.getLogger("xformers").setLevel(logging.ERROR)


def omegaconf_safe_globals() -> tp.List[tp.Any]:
    """The classes an audiocraft checkpoint that pickles omegaconf configs needs, and no more
    (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on such checkpoints)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode,
            IntegerNode, StringNode, tp.Any, dict, list, int, collections.defaultdict]


def load_musicgen(settings: Settings, device: str) -> tp.Any:
    """MusicGen for ``settings.model`` on ``device``; a clear error if any file is missing."""
    folder = weights.musicgen_folder(settings.weights_dir, settings.model)
    cfg = weights.read_lm_config(folder / weights.LM_FILE)
    weights.require(settings.weights_dir, weights.conditioner_files(cfg),
                    f"the model {settings.model} (its text/melody conditioners)")
    weights.use_hub_cache(settings.weights_dir)  # the conditioners read t5-base / htdemucs from it
    from audiocraft.models import MusicGen

    with timed(f"loaded {settings.model} on {device}", log):
        model = MusicGen.get_pretrained(str(folder), device=device)
    model.name = settings.model
    return model


def load_mbd(settings: Settings, device: str) -> tp.Any:
    """audiocraft's MultiBand Diffusion for MusicGen (32 kHz), from the weights folder."""
    weights.require(settings.weights_dir, weights.mbd_files(), "multi_band_diffusion")
    weights.use_hub_cache(settings.weights_dir)
    import torch
    from audiocraft.models import MultiBandDiffusion

    with timed(f"loaded MultiBand Diffusion on {device}", log):
        with torch.serialization.safe_globals(omegaconf_safe_globals()):
            return MultiBandDiffusion.get_mbd_musicgen(device=device)


class MBDSource:
    """Hands out the MBD decoder, loading it once: in setup (eager) or on first use (lazy)."""

    def __init__(self, settings: Settings, device: str):
        self._settings = settings
        self._device = device
        self._mbd: tp.Any = None
        self._lock = threading.Lock()
        if settings.mbd == "eager":
            self._mbd = load_mbd(settings, device)

    def unavailable(self) -> tp.Optional[str]:
        """Why a request can't use MBD on this deployment (None: it can)."""
        if self._settings.mbd == "off":
            return "MultiBand Diffusion is turned off on this deployment (MUSICGEN_MBD=off)"
        missing = [f for f in weights.mbd_files() if weights.cached_file(self._settings.weights_dir, f) is None]
        if missing:
            return (f"MultiBand Diffusion is not installed here: {', '.join(map(str, missing))} is missing "
                    f"from the weights folder (`{weights.DOWNLOAD_COMMAND}` fetches it)")
        return None

    def get(self) -> tp.Any:
        reason = self.unavailable()
        if reason:
            raise RuntimeError(reason)
        with self._lock:
            if self._mbd is None:
                self._mbd = load_mbd(self._settings, self._device)
            return self._mbd
