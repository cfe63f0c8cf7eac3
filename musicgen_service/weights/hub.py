"""The weights folder: a Hugging Face hub cache, and what each model needs from it.

The folder named by ``MUSICGEN_WEIGHTS`` is a hub cache in the hub's own layout
(``models--<org>--<name>/{blobs,refs,snapshots}``). audiocraft, transformers and
demucs read it through their unmodified loaders once :func:`use_hub_cache` has
pointed the hub libraries at it in offline mode, so nothing is ever fetched at
predict time.

This is the only module that knows repo ids and checkpoint file names.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..core import disk
from ..core.errors import WeightsMissingError

# audiocraft MusicGen checkpoint: the LM (with its conditioners' own weights) and EnCodec.
LM_FILE = "state_dict.bin"
COMPRESSION_FILE = "compression_state_dict.bin"
MUSICGEN_FILES = (LM_FILE, COMPRESSION_FILE)

# MultiBand Diffusion for MusicGen, as audiocraft's MultiBandDiffusion.get_mbd_musicgen loads it:
# the diffusion checkpoint plus the 32 kHz EnCodec of facebook/musicgen-small.
MBD_REPO = "facebook/multiband-diffusion"
MBD_FILE = "mbd_musicgen_32khz.th"
MBD_CODEC_REPO = "facebook/musicgen-small"

# demucs' htdemucs bag, as demucs.hf.get_hf_model('htdemucs') loads it (melody conditioner).
DEMUCS_REPO = "adefossez/HTDemucs"
DEMUCS_SIGNATURE = "955717e8"
DEMUCS_FILES = ("htdemucs.yaml", f"{DEMUCS_SIGNATURE}.safetensors")

# Files transformers reads for T5EncoderModel + T5Tokenizer (slow, sentencepiece) from a hub repo.
T5_FILES = ("config.json", "model.safetensors", "spiece.model")

# The LM's size of each published MusicGen (what a CPU user is told a request will cost).
MODEL_PARAMETERS = {
    "facebook/musicgen-small": 300e6,
    "facebook/musicgen-medium": 1.5e9,
    "facebook/musicgen-melody": 1.5e9,
    "facebook/musicgen-large": 3.3e9,
    "facebook/musicgen-melody-large": 3.3e9,
    "facebook/musicgen-stereo-small": 300e6,
    "facebook/musicgen-stereo-medium": 1.5e9,
    "facebook/musicgen-stereo-melody": 1.5e9,
    "facebook/musicgen-stereo-large": 3.3e9,
    "facebook/musicgen-stereo-melody-large": 3.3e9,
}
CPU_MODEL = "facebook/musicgen-small"  # the one that suits a CPU

DOWNLOAD_COMMAND = "script/download-weights"
TINY_COMMAND = "script/tiny-weights DIR"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}"


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """``models--org--name``: where the hub keeps one model repo inside a cache."""
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def use_hub_cache(cache_dir: Path) -> None:
    """Point huggingface_hub / transformers at ``cache_dir``, offline.

    These libraries read their settings when first imported, so this must run
    before anything imports them; a process that already imported them with a
    different cache is a programming error and fails loudly instead of silently
    reading (or downloading into) another folder.
    """
    cache_dir = Path(cache_dir).resolve()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        if Path(constants.HF_HUB_CACHE).resolve() != cache_dir or not constants.HF_HUB_OFFLINE:
            raise RuntimeError(
                "huggingface_hub was imported before the weights folder was configured "
                f"(it uses {constants.HF_HUB_CACHE}, offline={constants.HF_HUB_OFFLINE}); "
                "call musicgen_service.weights.hub.use_hub_cache first")
    os.environ["HF_HUB_CACHE"] = str(cache_dir)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def cached_file(cache_dir: Path, f: HubFile) -> tp.Optional[Path]:
    """The local path of ``f`` at revision ``main`` in the cache, or None.

    Resolved the way the hub reads its cache (``refs/main`` names the snapshot), without
    importing huggingface_hub, so it is usable before :func:`use_hub_cache`.
    """
    root = repo_folder(cache_dir, f.repo_id)
    try:
        revision = (root / "refs" / "main").read_text().strip()
    except OSError:
        return None
    path = root / "snapshots" / revision / f.filename
    return path if path.is_file() else None


def require(cache_dir: Path, files: tp.Iterable[HubFile], why: str) -> tp.Dict[HubFile, Path]:
    """Local paths of ``files``; one clear error listing every missing file."""
    found, missing = {}, []
    for f in files:
        path = cached_file(cache_dir, f)
        if path is None:
            missing.append(f)
        else:
            found[f] = path
    if missing:
        raise WeightsMissingError(
            f"weights: {why} needs {', '.join(map(str, missing))}, not found in {cache_dir}. "
            f"Run `{DOWNLOAD_COMMAND}` to fetch the weights into that folder "
            f"(or `{TINY_COMMAND}` for a tiny random set to try the service), "
            "or set MUSICGEN_WEIGHTS to the folder that holds them.")
    return found


def is_local_checkpoint(model: str) -> bool:
    """A model given as a folder path (e.g. a fine-tune) rather than a hub repo id."""
    return model.startswith(("/", ".", "~")) or Path(model).expanduser().is_dir()


def musicgen_folder(cache_dir: Path, model: str) -> Path:
    """The folder holding ``state_dict.bin`` and ``compression_state_dict.bin`` for ``model``."""
    if is_local_checkpoint(model):
        folder = Path(model).expanduser().resolve()
        missing = [f for f in MUSICGEN_FILES if not (folder / f).is_file()]
        if missing:
            raise WeightsMissingError(
                f"weights: the local model folder {folder} (MUSICGEN_MODEL) lacks {', '.join(missing)}; "
                "it must hold an audiocraft checkpoint (state_dict.bin + compression_state_dict.bin)")
        return folder
    paths = require(cache_dir, [HubFile(model, f) for f in MUSICGEN_FILES], f"the model {model}")
    return next(iter(paths.values())).parent


def conditioner_files(lm_cfg: tp.Any) -> tp.List[HubFile]:
    """Hub files that the conditioners named in an LM checkpoint's config load when built."""
    files: tp.List[HubFile] = []
    for cond in (lm_cfg.get("conditioners") or {}).values():
        kind = cond.get("model")
        if kind == "t5":
            files += [HubFile(cond["t5"]["name"], f) for f in T5_FILES]
        elif kind == "chroma_stem":
            files += [HubFile(DEMUCS_REPO, f) for f in DEMUCS_FILES]
    return files


def mbd_files() -> tp.List[HubFile]:
    return [HubFile(MBD_REPO, MBD_FILE), HubFile(MBD_CODEC_REPO, COMPRESSION_FILE)]


SAMPLES = 64  # blocks hashed by checkpoint_identity where the file's content hash is not known
SAMPLE_BYTES = 64 << 10


def checkpoint_identity(path: Path) -> tp.Dict[str, tp.Any]:
    """What identifies a checkpoint's content, cheaply: in the hub cache, its blob's name is the
    sha256 of its content (files stored with Git LFS, as checkpoints are); elsewhere, its size and the
    sha256 of 64 blocks of 64 KiB spread evenly over it (4 MiB read, whatever the size: any retrained
    or fine-tuned checkpoint differs in them). Used to key what is derived from a checkpoint."""
    path = Path(path)
    real = path.resolve()
    size = real.stat().st_size
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return {"size": size, "sha256": real.name}
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for i in range(SAMPLES):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLES - 1)))
            h.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sampled_sha256": h.hexdigest()}


def map_checkpoint(path: Path) -> tp.Dict[str, tp.Any]:
    """An audiocraft checkpoint (``{'xp.cfg': yaml, 'best_state': ...}``), memory-mapped: only its
    pickled header is read now, each tensor's bytes when first used. Safe loading stays on."""
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_lm_config(lm_checkpoint: Path) -> tp.Any:
    """The training config stored in an audiocraft LM checkpoint (``xp.cfg``), without reading
    the weights."""
    from omegaconf import OmegaConf

    return OmegaConf.create(map_checkpoint(lm_checkpoint)["xp.cfg"])


def write_repo(cache_dir: Path, repo_id: str, files: tp.Mapping[str, Path]) -> Path:
    """Store ``files`` (name -> local file) as revision ``main`` of ``repo_id`` in the hub's layout:
    content-addressed blobs, a snapshot folder of relative symlinks, and ``refs/main``."""
    root = repo_folder(cache_dir, repo_id)
    digests = {name: disk.sha256_of(Path(src)) for name, src in files.items()}
    revision = hashlib.sha1("".join(f"{n}:{d}" for n, d in sorted(digests.items())).encode()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = root / "blobs" / digests[name]
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot
