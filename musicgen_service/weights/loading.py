"""Building the models from the weights folder, at the speed of the disk.

Every model is built by audiocraft's (or transformers', or demucs') own builders
from its checkpoint's own format, with two changes to how stock audiocraft does
it (``MusicGen.get_pretrained``):

- **no throw-away initialisation**: modules are built with the torch.nn.init
  functions turned into no-ops (:func:`fast_build`), because every
  parameter and buffer is overwritten right after by a strict
  ``load_state_dict``. Stock audiocraft first fills 420M+ parameters with random
  numbers, which is most of its load time;
- **mapped checkpoints**: ``torch.load(mmap=True)`` maps the file; weights are
  read from the page cache straight into the parameters (converted to the
  device's dtype on the way), so no second full copy of the checkpoint is held
  in memory.

Measured on musicgen-small (fp16 checkpoint of 840 MB, 2 CPU cores): see
bench/results/ (``setup_speedup_vs_stock``). ``_load_lm`` and ``_load_compression``
follow audiocraft 1.3.0's ``loaders.load_lm_model`` / ``load_compression_model``
step by step so that each step can be timed; a test checks they give the same
parameters and the same tokens as the stock loader.

MultiBand Diffusion loads through ``MultiBandDiffusion.get_mbd_musicgen`` itself,
in the same fast context, with torch's safe loading kept on and only the
omegaconf classes its checkpoint pickles allowed. It is loaded in ``setup()``
(``MUSICGEN_MBD=eager``) or on first use (``lazy``).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import sys
import time
import typing as tp
from pathlib import Path

from ..core.imports import deferred_imports
from ..core.logs import get_logger, timed
from . import hub as weights

if tp.TYPE_CHECKING:
    from audiocraft.models import MultiBandDiffusion, MusicGen

log = get_logger()
# audiocraft imports xformers unconditionally but runs its 'torch' attention backend; xformers' warning
# that its own compiled kernels don't match this torch build is noise on the prediction page.
logging.getLogger("xformers").setLevel(logging.ERROR)

# What audiocraft's loaders.load_lm_model removes from a checkpoint's config before building.
_TRAINING_ONLY_PARAMS = ("conditioners.self_wav.chroma_stem.cache_path",
                         "conditioners.args.merge_text_conditions_p", "conditioners.args.drop_desc_p")


def omegaconf_safe_globals() -> tp.List[tp.Any]:
    """The classes an audiocraft checkpoint that pickles omegaconf configs needs, and no more
    (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on such checkpoints)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode,
            IntegerNode, StringNode, tp.Any, dict, list, int, collections.defaultdict]


def _skip(*args: tp.Any, **kwargs: tp.Any) -> None:
    return None


@contextlib.contextmanager
def fast_build() -> tp.Iterator[None]:
    """Build modules without random initialisation, and map (not read) checkpoints that
    ``torch.load`` opens, for the duration of the block. Only for modules whose every weight is
    loaded strictly afterwards.

    Like transformers' ``no_init_weights``, the ``torch.nn.init`` functions become no-ops. That
    context cannot simply be used here: the T5 conditioner's ``from_pretrained``, called in the middle
    of audiocraft's LM builder, enters and leaves its own ``no_init_weights``, whose exit puts the real
    functions back (from ``transformers.modeling_utils.TORCH_INIT_FUNCTIONS``) before the LM's own
    layers are built. So that table points at the no-op too while the block runs. Some torch modules
    bind init functions by name (``torch.nn.modules.activation``: ``xavier_uniform_``, which
    ``nn.MultiheadAttention`` calls; audiocraft's layers build one each, then replace it): those
    names are patched too (measured on musicgen-small, AMD EPYC AVX2: 0.73 s of a 1.6 s LM build).
    """
    import torch
    from torch.utils.serialization import config
    from transformers import modeling_utils

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    saved_init = {n: getattr(torch.nn.init, n) for n in names}
    saved_table = dict(modeling_utils.TORCH_INIT_FUNCTIONS)
    bound = [(sys.modules[m], n) for m in list(sys.modules) if m.startswith("torch.nn.modules.")
             for n in names if getattr(sys.modules[m], n, None) is saved_init[n]]
    mmap = config.load.mmap
    try:
        for module, n in bound:
            setattr(module, n, _skip)
        for n in names:
            setattr(torch.nn.init, n, _skip)
        for n in saved_table:
            modeling_utils.TORCH_INIT_FUNCTIONS[n] = _skip
        config.load.mmap = True
        yield
    finally:
        config.load.mmap = mmap
        modeling_utils.TORCH_INIT_FUNCTIONS.update(saved_table)
        for n, fn in saved_init.items():
            setattr(torch.nn.init, n, fn)
        for module, n in bound:
            setattr(module, n, saved_init[n])


def _lm_dtype(device: str) -> str:
    return "float32" if device == "cpu" else "float16"  # as audiocraft's loaders choose


def _load_lm(pkg: tp.Dict[str, tp.Any], device: str, timings: tp.Dict[str, float],
             skip: tp.Optional[tp.Callable[[str], bool]] = None) -> tp.Any:
    """``loaders.load_lm_model`` from a mapped checkpoint, built without random initialisation.
    ``skip``: parameters not to read (a prepared decoder holds them in its own format): they are left
    empty, and every other parameter is still loaded strictly."""
    from omegaconf import OmegaConf
    from audiocraft.models import builders, loaders

    start = time.perf_counter()
    cfg = OmegaConf.create(pkg["xp.cfg"])
    cfg.device, cfg.dtype = str(device), _lm_dtype(device)
    for name in _TRAINING_ONLY_PARAMS:
        loaders._delete_param(cfg, name)
    timings["map"] = time.perf_counter() - start
    start = time.perf_counter()
    with fast_build():
        lm = builders.get_lm_model(cfg)  # builds the T5 / chroma conditioners, which load their weights
    timings["build"] = time.perf_counter() - start
    start = time.perf_counter()
    state = pkg["best_state"]
    skipped = {name for name in state if skip is not None and skip(name)} if skip is not None else set()
    if skipped:
        import torch

        missing, unexpected = lm.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
        if set(missing) != skipped or unexpected:
            raise RuntimeError(f"checkpoint and LM disagree: missing {sorted(set(missing) - skipped)}, "
                               f"unexpected {unexpected}")
        for name in skipped:
            param = lm.get_parameter(name)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    else:
        lm.load_state_dict(state)  # reads the mapped file into the parameters, on the device
    lm.eval()
    lm.cfg = cfg
    _sync(device)
    timings["load weights"] = time.perf_counter() - start
    return lm


def _load_compression(path: Path, device: str, timings: tp.Dict[str, float]) -> tp.Any:
    """``loaders.load_compression_model``, from the mapped checkpoint, without random initialisation."""
    from omegaconf import OmegaConf
    from audiocraft.models import builders, loaders

    start = time.perf_counter()
    pkg = weights.map_checkpoint(path)
    if "pretrained" in pkg:  # a pointer to a released codec: audiocraft's own path
        with fast_build():
            return loaders.load_compression_model(path, device=device)
    cfg = OmegaConf.create(pkg["xp.cfg"])
    cfg.device = str(device)
    timings["map"] = time.perf_counter() - start
    start = time.perf_counter()
    with fast_build():
        model = builders.get_compression_model(cfg)
    timings["build"] = time.perf_counter() - start
    start = time.perf_counter()
    model.load_state_dict(pkg["best_state"])
    model.eval()
    _sync(device)
    timings["load weights"] = time.perf_counter() - start
    return model


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _log_parts(what: str, timings: tp.Dict[str, float]) -> None:
    log.info("%s: %.2f s (%s)", what, sum(timings.values()),
             ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))


def import_audiocraft(weights_dir: Path) -> None:
    """Import what building MusicGen needs (not what it only uses on demand: :mod:`..core.imports`),
    with the hub libraries pointed at the weights folder, offline; timed in the logs. :func:`load_musicgen`
    does it itself if it was not done."""
    weights.use_hub_cache(weights_dir)  # before anything imports huggingface_hub
    if "audiocraft.models" in sys.modules:
        return
    with deferred_imports(), timed("imported audiocraft", log):
        import audiocraft.models  # noqa: F401


def load_musicgen(weights_dir: Path, model: str, device: str,
                  skip: tp.Optional[tp.Callable[[str], bool]] = None) -> "MusicGen":
    """MusicGen ``model`` (a hub id in ``weights_dir``, or a local checkpoint folder) on ``device``; a
    clear error if any file is missing. ``skip``: LM parameters left unread (:func:`_load_lm`)."""
    from omegaconf import OmegaConf

    folder = weights.musicgen_folder(weights_dir, model)
    lm_pkg = weights.map_checkpoint(folder / weights.LM_FILE)
    weights.require(weights_dir, weights.conditioner_files(OmegaConf.create(lm_pkg["xp.cfg"])),
                    f"the model {model} (its text/melody conditioners)")
    weights.use_hub_cache(weights_dir)  # the conditioners read t5-base / htdemucs from it
    # (deferred imports through the build too: audiocraft's attention layers check for xformers' kernels
    # as they are built, and only the stock attention of a forward pass would use them)
    with deferred_imports():
        import_audiocraft(weights_dir)
        from audiocraft.models import MusicGen
        lm_timings: tp.Dict[str, float] = {}
        lm = _load_lm(lm_pkg, device, lm_timings, skip)
        del lm_pkg
        _log_parts(f"loaded the LM ({sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M parameters read, "
                   "with its T5 / chroma conditioners)", lm_timings)
        codec_timings: tp.Dict[str, float] = {}
        codec = _load_compression(folder / weights.COMPRESSION_FILE, device, codec_timings)
        _log_parts("loaded EnCodec", codec_timings)
    loaded = MusicGen(model, codec, lm)
    if "self_wav" in lm.condition_provider.conditioners:  # as MusicGen.get_pretrained sets them
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
    return loaded


def load_mbd(weights_dir: Path, device: str) -> "MultiBandDiffusion":
    """audiocraft's MultiBand Diffusion for MusicGen (32 kHz), from the weights folder."""
    weights.require(weights_dir, weights.mbd_files(), "multi_band_diffusion")
    weights.use_hub_cache(weights_dir)
    import torch
    from audiocraft.models import MultiBandDiffusion

    with timed(f"loaded MultiBand Diffusion on {device}", log):
        with torch.serialization.safe_globals(omegaconf_safe_globals()), fast_build():
            mbd = MultiBandDiffusion.get_mbd_musicgen(device=device)
        _sync(device)
    return mbd
