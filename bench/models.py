"""Real-size MusicGen model sets with random weights, in the real on-disk formats.

Speed and memory do not depend on weight values, so a random model of the real
architecture measures what the real one would. Each set is a hub cache laid out
like ``weights/`` (same repo ids and file names) and written by the same code as
the tiny test set (:mod:`musicgen_service.tools.tiny`), with real sizes:

- the LM from audiocraft's own configs (lm/default -> model_scale -> conditioner
  -> lm/musicgen_lm merged): musicgen-small is dim 1024, 16 heads, 24 layers
  (420.4M parameters); medium 1536/24/48; large 2048/32/48; fp16 state dicts like
  the hub's;
- EnCodec 32 kHz as MusicGen's (encodec_large_nq4_s640: 128-d latent, 64 filters,
  2 LSTM layers, 4 codebooks of 2048);
- T5-base (12+12 layers, d_model 768, d_ff 3072, 12 heads, vocabulary 32128);
- htdemucs with HTDemucs' default architecture (melody models only);
- MultiBand Diffusion: 4 bands of model/score/basic.yaml's U-Net (hidden 48, depth
  4, growth 4: 166M parameters a band). The released checkpoint's exact configuration
  is not available offline, so MBD timings are indicative.

``xsmall`` (audiocraft's debug scale: dim 64, 2 layers), with the real EnCodec and the
tiny T5 of the test set, serves the quick smoke run.
"""

from __future__ import annotations

import tempfile
import time
import typing as tp
from pathlib import Path

from musicgen_service.tools import tiny
from musicgen_service.weights import hub as weights

# name -> (dim, heads, layers): audiocraft's config/model/lm/model_scale/*.yaml
SCALES = {"xsmall": (64, 2, 2), "small": (1024, 16, 24), "medium": (1536, 24, 48), "large": (2048, 32, 48)}
# the hub ids the service would be pointed at for each benchmarked model: (scale, melody, stereo)
MODEL_IDS = {
    ("small", False, False): "facebook/musicgen-small",
    ("medium", False, False): "facebook/musicgen-medium",
    ("medium", True, False): "facebook/musicgen-melody",
    ("large", False, False): "facebook/musicgen-large",
    ("large", True, False): "facebook/musicgen-melody-large",
    ("large", True, True): "facebook/musicgen-stereo-melody-large",  # the service's default model
    ("small", True, False): "bench/musicgen-small-melody",  # not released: small LM + melody conditioner
    ("xsmall", False, False): "bench/musicgen-xsmall",
    ("xsmall", True, False): "bench/musicgen-xsmall-melody",
    ("xsmall", True, True): "bench/musicgen-xsmall-stereo-melody",
}
REAL_ENCODEC = tiny.encodec_config(dimension=128, n_filters=64, lstm=2)
MBD_BANDS = 4


def real_t5_config() -> tp.Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        decoder_start_token_id=0,
    )


def lm_config(scale: str, melody: bool, stereo: bool = False) -> tp.Dict[str, tp.Any]:
    dim, heads, layers = SCALES[scale]
    return tiny.lm_config(2 if stereo else 1, melody, dim=dim, num_heads=heads, num_layers=layers, hidden_scale=4)


def model_id(scale: str, melody: bool, stereo: bool = False) -> str:
    return MODEL_IDS[(scale, melody, stereo)]


def ensure_set(
    cache_dir: Path,
    scale: str,
    melody: bool,
    mbd: bool = True,
    real_t5: bool = True,
    log: tp.Callable[[str], None] = print,
    stereo: bool = False,
    device: str = "cpu",
    real_codec: bool = True,
) -> str:
    """Write what is missing of the set for (scale, melody, stereo) into ``cache_dir``; returns the
    model id. Each piece is written once and reused by later runs. ``real_t5=False`` (the smoke run)
    writes the test suite's tiny T5 and tiny htdemucs instead of the real architectures, and narrower
    MBD U-Nets. ``device``: where random weights are drawn (``cuda`` is much faster for the large models)."""
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights.use_hub_cache(cache_dir)
    mid = model_id(scale, melody, stereo)

    def missing(repo: str, files: tp.Iterable[str]) -> bool:
        return any(weights.cached_file(cache_dir, weights.HubFile(repo, f)) is None for f in files)

    codec = REAL_ENCODEC if real_codec else tiny.encodec_config()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="musicgen-bench-") as tmp:
        work = Path(tmp)
        if missing("t5-base", weights.T5_FILES):
            log(f"writing t5-base (random, {'real' if real_t5 else 'tiny'} architecture)")
            tiny.write_t5(cache_dir, work, real_t5_config() if real_t5 else tiny.tiny_t5_config(), device=device)
        if melody and missing(weights.DEMUCS_REPO, weights.DEMUCS_FILES):
            log(f"writing htdemucs (random, {'real' if real_t5 else 'tiny'} architecture)")
            tiny.write_demucs(cache_dir, work, tiny.REAL_DEMUCS if real_t5 else None)
        if missing(mid, weights.MUSICGEN_FILES):
            log(f"writing {mid} ({scale}, melody={melody}, stereo={stereo}; random, fp16)")
            tiny.write_musicgen(cache_dir, work, mid, lm_config(scale, melody, stereo), codec, half=True, device=device)
        if mbd and missing(weights.MBD_CODEC_REPO, weights.MUSICGEN_FILES):
            log("writing the EnCodec that MBD decodes with")
            tiny.write_musicgen(
                cache_dir, work, weights.MBD_CODEC_REPO, lm_config("xsmall", False), codec, half=True, device=device
            )
        if mbd and missing(weights.MBD_REPO, [weights.MBD_FILE]):
            if real_codec:  # score/basic.yaml: 166M parameters a band; the smoke run's growth 2: 4.7M
                growth = 4 if real_t5 else 2
                log(f"writing MultiBand Diffusion (random, score/basic.yaml U-Nets, growth {growth})")
                band = tiny.mbd_band_config(codec["seanet"]["dimension"], hidden=48, depth=4, growth=growth)
            else:
                log("writing MultiBand Diffusion (random, the test suite's tiny U-Nets)")
                band = tiny.mbd_band_config(codec["seanet"]["dimension"])
            tiny.write_mbd(cache_dir, work, MBD_BANDS, band, device=device)
    log(f"model set for {mid} ready in {time.perf_counter() - start:.1f} s")
    return mid
