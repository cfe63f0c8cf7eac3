"""A tiny random model set, written in the real on-disk formats.

Everything the service loads in production exists here in miniature, under the
same hub repo ids and file names, so the unmodified loaders (audiocraft's,
transformers', demucs') run on it:

- ``facebook/musicgen-stereo-melody-large``, ``facebook/musicgen-melody`` and
  ``facebook/musicgen-small``: audiocraft checkpoints (``state_dict.bin`` and
  ``compression_state_dict.bin``: dicts with ``xp.cfg`` as a YAML string and
  ``best_state``), with a 32 kHz / 50 Hz EnCodec and an LM of card 2048;
- ``t5-base``: a T5 of hidden size 768 (what audiocraft expects of ``t5-base``)
  with one layer, and a sentencepiece tokenizer trained on a few sentences;
- ``adefossez/HTDemucs``: a small HTDemucs saved the way demucs' hub export does
  (a bag yaml + a safetensors file whose metadata holds the class and arguments);
- ``facebook/multiband-diffusion``: a two-band MultiBand Diffusion checkpoint
  that pickles omegaconf configs, as the real one does.

The weights are random: the audio is noise, but shapes, rates, lengths, code
paths and file formats are the production ones. ``script/tiny-weights DIR``
writes the set; the test suite builds it once per session.
"""

from __future__ import annotations

import io
import json
import tempfile
import typing as tp
from fractions import Fraction
from pathlib import Path

from ..weights import hub as weights

SAMPLE_RATE = 32000
CARD = 2048
SEGMENT_DURATION = 30

# model id -> (channels, melody conditioning)
MODELS: tp.Dict[str, tp.Tuple[int, bool]] = {
    "facebook/musicgen-stereo-melody-large": (2, True),
    "facebook/musicgen-melody": (1, True),
    "facebook/musicgen-small": (1, False),
}

_SENTENCES = [
    "lo-fi hip hop beat with warm piano chords and vinyl crackle",
    "an upbeat electronic dance track with a driving bass line",
    "calm acoustic guitar melody, relaxing, slow tempo",
    "epic orchestral soundtrack with strings, brass and big drums",
    "jazz trio with walking bass, brushed drums and a smoky saxophone",
    "80s synthwave with gated reverb snare and arpeggiated synths",
    "ambient drone pad, evolving textures, cinematic and dark",
    "funky disco groove with slap bass and bright horns at 120 bpm",
    "heavy metal riff with distorted guitars and double kick drums",
    "reggae rhythm with offbeat guitar skank and deep dub bass",
    "classical string quartet in a minor key, melancholic",
    "tropical house with steel drums, marimba and soft vocals",
    "a happy children's song with ukulele and hand claps",
    "techno, four on the floor kick, hypnotic and minimal",
    "folk ballad with fiddle, banjo and harmonica",
    "cumbia, bossa nova, flamenco, kpop, trap, drill, dubstep, garage",
]


def _torch_save(obj: tp.Any, path: Path) -> Path:
    import torch

    torch.save(obj, path)
    return path


def encodec_config(channels: int = 1, dimension: int = 16, n_filters: int = 2, lstm: int = 0) -> tp.Dict[str, tp.Any]:
    """EnCodec at the real 32 kHz rate and 640-sample hop (50 frames/s); small by default.
    ``dimension=128, n_filters=64, lstm=2`` is MusicGen's (encodec_large_nq4_s640)."""
    return {
        "device": "cpu",
        "dtype": "float32",
        "sample_rate": SAMPLE_RATE,
        "channels": channels,
        "compression_model": "encodec",
        "encodec": {
            "autoencoder": "seanet",
            "quantizer": "rvq",
            "sample_rate": SAMPLE_RATE,
            "channels": channels,
            "causal": False,
            "renormalize": False,
        },
        "seanet": {
            "dimension": dimension,
            "channels": channels,
            "causal": False,
            "n_filters": n_filters,
            "n_residual_layers": 1,
            "ratios": [8, 5, 4, 4],
            "activation": "ELU",
            "activation_params": {"alpha": 1.0},
            "norm": "weight_norm",
            "norm_params": {},
            "kernel_size": 7,
            "residual_kernel_size": 3,
            "last_kernel_size": 7,
            "dilation_base": 2,
            "pad_mode": "constant",
            "true_skip": True,
            "compress": 2,
            "lstm": lstm,
            "disable_norm_outer_blocks": 0,
            "decoder": {"trim_right_ratio": 1.0, "final_activation": None, "final_activation_params": None},
            "encoder": {},
        },
        "rvq": {
            "n_q": 4,
            "q_dropout": False,
            "bins": CARD,
            "decay": 0.99,
            "kmeans_init": True,
            "kmeans_iters": 50,
            "threshold_ema_dead_code": 2,
            "orthogonal_reg_weight": 0.0,
            "orthogonal_reg_active_codes_only": False,
        },
    }


def lm_config(
    channels: int, melody: bool, dim: int = 32, num_heads: int = 2, num_layers: int = 2, hidden_scale: int = 4
) -> tp.Dict[str, tp.Any]:
    """An LM configured like MusicGen's (lm/musicgen_lm.yaml: delay pattern, T5 text through
    cross-attention; conditioner/chroma2music.yaml for melody models), two layers wide 32 by
    default; ``dim=1024, num_heads=16, num_layers=24`` is musicgen-small."""
    n_q = 4 * channels
    delays = [d for d in range(4) for _ in range(channels)]  # stereo: [0, 0, 1, 1, 2, 2, 3, 3]
    t5 = {"model": "t5", "t5": {"name": "t5-base", "finetune": False, "word_dropout": 0.3, "normalize_text": False}}
    if melody:  # conditioner/chroma2music.yaml
        conditioners = {
            "self_wav": {
                "model": "chroma_stem",
                "chroma_stem": {
                    "sample_rate": SAMPLE_RATE,
                    "n_chroma": 12,
                    "radix2_exp": 14,
                    "argmax": True,
                    "match_len_on_eval": False,
                    "eval_wavs": None,
                    "n_eval_wavs": 100,
                    "cache_path": None,
                },
            },
            "description": t5,
        }
        fuser = {"prepend": ["self_wav", "description"], "cross": []}
        attribute_dropout = {"args": {"active_on_eval": False}, "text": {}, "wav": {"self_wav": 0.5}}
    else:  # conditioner/text2music.yaml
        conditioners = {"description": t5}
        fuser = {"prepend": [], "cross": ["description"]}
        attribute_dropout = {}
    return {
        "device": "cpu",
        "dtype": "float32",
        "sample_rate": SAMPLE_RATE,
        "channels": channels,
        "lm_model": "transformer_lm",
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": delays, "flatten_first": 0, "empty_initial": 0}},
        "transformer_lm": {
            "dim": dim,
            "num_heads": num_heads,
            "num_layers": num_layers,
            "hidden_scale": hidden_scale,
            "n_q": n_q,
            "card": CARD,
            "dropout": 0.0,
            "emb_lr": None,
            "activation": "gelu",
            "norm_first": True,
            "bias_ff": False,
            "bias_attn": False,
            "bias_proj": False,
            "past_context": None,
            "causal": True,
            "custom": False,
            "memory_efficient": True,
            "attention_as_float32": False,
            "layer_scale": None,
            "positional_embedding": "sin",
            "xpos": False,
            "checkpointing": "none",
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "norm": "layer_norm",
            "cross_attention": False,
            "qk_layer_norm": False,
            "qk_layer_norm_cross": False,
            "attention_dropout": None,
            "kv_repeat": 1,
            "two_step_cfg": False,
        },
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": attribute_dropout,
        "fuser": {
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "input_interpolate": [],
            **fuser,
        },
        "conditioners": conditioners,
        "dataset": {"segment_duration": SEGMENT_DURATION, "batch_size": 1},
        "interleave_stereo_codebooks": {"use": channels == 2, "per_timestep": False},
        "compression_model_n_q": None,
    }


def mbd_band_config(
    codec_dim: int, hidden: int = 8, depth: int = 3, stride: int = 4, growth: float = 2
) -> tp.Dict[str, tp.Any]:
    """One band of MultiBand Diffusion (solver/diffusion/default.yaml), a very small U-Net by
    default; ``hidden=48, depth=4, growth=4`` is model/score/basic.yaml's."""
    return {
        "channels": 1,
        "schedule": {
            "repartition": "power",
            "variable_step_batch": True,
            "beta_t0": 1.0e-5,
            "beta_t1": 2.9e-2,
            "beta_exp": 7.5,
            "num_steps": 1000,
            "variance": "beta",
            "clip": 5.0,
            "rescale": 1.0,
            "n_bands": None,
            "noise_scale": 1.0,
        },
        "diffusion_unet": {
            "hidden": hidden,
            "depth": depth,
            "res_blocks": 1,
            "norm_groups": 4,
            "kernel": 8,
            "stride": stride,
            "growth": growth,
            "max_channels": 10_000,
            "dropout": 0.0,
            "emb_all_layers": True,
            "bilstm": False,
            "transformer": False,
            "codec_dim": codec_dim,
        },
        "processor": {
            "name": "multi_band_processor",
            "use": False,
            "n_bands": 8,
            "num_samples": 10_000,
            "power_std": 1.0,
        },
    }


def _yaml(cfg: tp.Dict[str, tp.Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def _randomize_codebooks(model: tp.Any) -> None:
    """EnCodec's k-means codebooks start at zero until trained: give them random values."""
    import torch

    for name, buf in model.named_buffers():
        if name.endswith("_codebook.embed"):
            buf.copy_(torch.randn_like(buf))
        elif name.endswith("_codebook.inited"):
            buf.fill_(1.0)


def build_encodec(cfg: tp.Optional[tp.Dict[str, tp.Any]] = None, seed: int = 0) -> tp.Any:
    import torch
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = builders.get_compression_model(OmegaConf.create(cfg or encodec_config())).eval()
    with torch.no_grad():
        _randomize_codebooks(model)
    return model


def tiny_t5_config() -> tp.Any:
    """audiocraft's T5Conditioner fixes t5-base's hidden size at 768; the rest is shrunk."""
    from transformers import T5Config

    return T5Config(
        vocab_size=128 + 100,
        d_model=768,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )


def write_t5(cache_dir: Path, work: Path, config: tp.Any = None, device: str = "cpu") -> None:
    """t5-base's files: config + weights of a random T5 (``config``, tiny by default) and a
    sentencepiece tokenizer trained on a few sentences. ``device``: where the random weights are
    drawn (a GPU draws a real-size model's in a fraction of the CPU's time)."""
    import sentencepiece as spm
    import torch
    from transformers import T5ForConditionalGeneration

    corpus = io.StringIO("\n".join(_SENTENCES * 4))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.getvalue().splitlines()),
        model_prefix=str(work / "spiece"),
        vocab_size=128,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        t5 = T5ForConditionalGeneration(config or tiny_t5_config())
    t5.save_pretrained(work / "t5", safe_serialization=True)
    weights.write_repo(
        cache_dir,
        "t5-base",
        {
            "config.json": work / "t5" / "config.json",
            "model.safetensors": work / "t5" / "model.safetensors",
            "spiece.model": work / "spiece.model",
        },
    )


TINY_DEMUCS = {
    "channels": 4,
    "depth": 2,
    "nfft": 512,
    "t_layers": 0,
    "dconv_depth": 1,
    "dconv_comp": 2,
    "rewrite": False,
    "segment": Fraction(2),
}
REAL_DEMUCS = {"segment": Fraction(39, 5)}  # htdemucs: HTDemucs' defaults, 7.8 s segments


def write_demucs(cache_dir: Path, work: Path, arch: tp.Optional[tp.Dict[str, tp.Any]] = None) -> None:
    """An HTDemucs with the real sources and rate (``arch``: constructor arguments, tiny by
    default), saved as demucs' hub export does."""
    import torch
    from demucs.htdemucs import HTDemucs
    from safetensors.torch import save_file

    kwargs = {
        "sources": ["drums", "bass", "other", "vocals"],
        "audio_channels": 2,
        "samplerate": 44100,
        **(TINY_DEMUCS if arch is None else arch),
    }
    torch.manual_seed(0)
    model = HTDemucs(**kwargs)

    def encode(value: tp.Any) -> tp.Any:
        if isinstance(value, Fraction):
            return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
        return value

    metadata = {
        "klass": "demucs.htdemucs.HTDemucs",
        "args": json.dumps([]),
        "kwargs": json.dumps({k: encode(v) for k, v in kwargs.items()}),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    sig = weights.DEMUCS_SIGNATURE
    save_file(state, str(work / f"{sig}.safetensors"), metadata=metadata)
    (work / "htdemucs.yaml").write_text(f"models: ['{sig}']\n")
    weights.write_repo(
        cache_dir,
        weights.DEMUCS_REPO,
        {
            "htdemucs.yaml": work / "htdemucs.yaml",
            f"{sig}.safetensors": work / f"{sig}.safetensors",
        },
    )


def write_musicgen(
    cache_dir: Path,
    work: Path,
    model_id: str,
    cfg: tp.Dict[str, tp.Any],
    codec_cfg: tp.Optional[tp.Dict[str, tp.Any]] = None,
    half: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> None:
    """An audiocraft checkpoint pair for the LM config ``cfg``, built by audiocraft's builders
    with their own random initialisation (the LM on ``device``); ``half`` stores fp16 state dicts,
    as the hub does.
    Needs t5-base (and HTDemucs for melody) in ``cache_dir`` already: the LM's conditioners
    load them when the real builder constructs it."""
    import torch
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    codec_cfg = codec_cfg or encodec_config()
    codec = build_encodec(codec_cfg, seed)
    torch.manual_seed(seed + 1)
    lm = builders.get_lm_model(OmegaConf.create({**cfg, "device": device})).eval()

    def state(module: tp.Any) -> tp.Dict[str, tp.Any]:
        return {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in module.state_dict().items()}

    folder = work / model_id.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"version": "1.3.0", "exported": True}
    files = {
        weights.LM_FILE: _torch_save({"xp.cfg": _yaml(cfg), "best_state": state(lm), **meta}, folder / weights.LM_FILE),
        weights.COMPRESSION_FILE: _torch_save(
            {"xp.cfg": _yaml(codec_cfg), "best_state": state(codec), **meta}, folder / weights.COMPRESSION_FILE
        ),
    }
    del lm
    weights.write_repo(cache_dir, model_id, files)
    for f in files.values():
        f.unlink()  # the cache holds its own copy


def write_mbd(
    cache_dir: Path,
    work: Path,
    n_bands: int = 2,
    band_cfg: tp.Optional[tp.Dict[str, tp.Any]] = None,
    device: str = "cpu",
) -> None:
    """MultiBand Diffusion in the format ``loaders.load_diffusion_models`` reads: omegaconf
    configs pickled next to each band's U-Net and processor states (U-Nets drawn on ``device``)."""
    import torch
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    torch.manual_seed(7)
    band_cfg = band_cfg or mbd_band_config(encodec_config()["seanet"]["dimension"])
    pkg: tp.Dict[tp.Any, tp.Any] = {"sample_rate": SAMPLE_RATE, "n_bands": n_bands}
    for band in range(n_bands):
        cfg = OmegaConf.create(band_cfg)
        with torch.device(device):
            model = builders.get_diffusion_model(cfg)
        processor = builders.get_processor(cfg.processor, sample_rate=SAMPLE_RATE)
        pkg[band] = {
            "cfg": cfg,
            "model_state": {k: v.cpu() for k, v in model.state_dict().items()},
            "processor_state": processor.state_dict(),
        }
    weights.write_repo(cache_dir, weights.MBD_REPO, {weights.MBD_FILE: _torch_save(pkg, work / weights.MBD_FILE)})


def write_tiny_set(cache_dir: Path, models: tp.Iterable[str] = tuple(MODELS)) -> Path:
    """Write the whole tiny set into ``cache_dir`` (a hub cache) and return it."""
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights.use_hub_cache(cache_dir)
    with tempfile.TemporaryDirectory(prefix="musicgen-tiny-") as tmp:
        work = Path(tmp)
        write_t5(cache_dir, work)
        write_demucs(cache_dir, work)
        for model_id in models:
            write_musicgen(cache_dir, work, model_id, lm_config(*MODELS[model_id]))
        if weights.MBD_CODEC_REPO not in models:  # MBD decodes with musicgen-small's EnCodec
            write_musicgen(cache_dir, work, weights.MBD_CODEC_REPO, lm_config(*MODELS[weights.MBD_CODEC_REPO]))
        write_mbd(cache_dir, work)
    return cache_dir
