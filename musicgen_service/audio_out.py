"""Turning generated audio into the file a user downloads: normalization, then wav or mp3.

Normalization is audiocraft's own (``audio_utils.normalize_audio``, with the
same settings its ``audio_write`` uses and the loudness compressor on, as the
original MusicGen predictor did). Encoding happens in-process: wav through
soundfile (16-bit PCM, like ``audio_write``), mp3 through lameenc (320 kbps),
so no ffmpeg binary is needed at run time. ``audio_write`` itself is not used
because it pipes every format, wav included, through an ``ffmpeg`` subprocess.

Each output is written to a fresh temporary folder under a temporary name and
renamed into place once complete: a failed write leaves nothing behind, and
concurrent predictions never share a file.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np

MP3_KBPS = 320
PEAK_CLIP_HEADROOM_DB = 1.0
RMS_HEADROOM_DB = 18.0
LOUDNESS_HEADROOM_DB = 14.0  # target loudness: -14 LUFS


def normalize(wav: tp.Any, sample_rate: int, strategy: str) -> tp.Any:
    """``wav`` [C, T] float -> normalized [C, T] float within [-1, 1] (audiocraft's strategies)."""
    import torch
    from audiocraft.data.audio_utils import normalize_audio

    wav = wav.detach().to("cpu", torch.float32)
    if not torch.isfinite(wav).all():
        raise RuntimeError("generated audio contains NaN or infinite samples")
    if wav.abs().max() == 0:  # silence: every strategy would divide by zero
        return wav
    return normalize_audio(
        wav, normalize=True, strategy=strategy, peak_clip_headroom_db=PEAK_CLIP_HEADROOM_DB,
        rms_headroom_db=RMS_HEADROOM_DB, loudness_headroom_db=LOUDNESS_HEADROOM_DB,
        loudness_compressor=True, log_clipping=False, sample_rate=sample_rate)


def _pcm16(wav: tp.Any) -> np.ndarray:
    """[C, T] float in [-1, 1] -> [T, C] int16, interleaved frames."""
    samples = wav.clamp(-1, 1).numpy().T
    return np.ascontiguousarray(np.round(samples * 32767.0).astype(np.int16))


def encode_wav(wav: tp.Any, sample_rate: int, path: Path) -> None:
    import soundfile

    soundfile.write(str(path), _pcm16(wav), sample_rate, subtype="PCM_16", format="WAV")


def encode_mp3(wav: tp.Any, sample_rate: int, path: Path) -> None:
    import lameenc

    channels = wav.shape[0]
    if channels not in (1, 2):
        raise ValueError(f"mp3 holds mono or stereo audio, not {channels} channels")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(MP3_KBPS)
    encoder.set_in_sample_rate(sample_rate)
    encoder.set_channels(channels)
    encoder.set_quality(2)  # 2 = high quality, 7 = fastest
    data = encoder.encode(_pcm16(wav).tobytes()) + encoder.flush()
    path.write_bytes(bytes(data))


ENCODERS = {"wav": encode_wav, "mp3": encode_mp3}


def write(wav: tp.Any, sample_rate: int, output_format: str, folder: Path, stem: str = "output") -> Path:
    """Encode ``wav`` (already normalized) as ``folder/stem.<format>``, atomically."""
    final = Path(folder) / f"{stem}.{output_format}"
    partial = final.with_name(f".{final.name}.partial")
    try:
        ENCODERS[output_format](wav, sample_rate, partial)
        partial.replace(final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final
