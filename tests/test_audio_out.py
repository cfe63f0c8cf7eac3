"""Normalization strategies (audiocraft's) and in-process wav/mp3 encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from audio_helpers import decode, sine

from musicgen_service.audio import output_audio as audio_out

RATE = 32000
PEAK = 10 ** (-1 / 20)  # -1 dBFS headroom


def loudness(wav: torch.Tensor) -> float:
    import torchaudio

    return torchaudio.transforms.Loudness(RATE)(wav).item()


def test_peak_leaves_one_db_of_headroom():
    out = audio_out.normalize(torch.from_numpy(sine(440, 2, amplitude=0.2, channels=2)), RATE, "peak")
    assert out.abs().max().item() == pytest.approx(PEAK, rel=1e-4)


def test_clip_bounds_samples_at_minus_one_db():
    loud = torch.from_numpy(sine(440, 2, amplitude=3.0))
    out = audio_out.normalize(loud, RATE, "clip")
    assert out.abs().max().item() == pytest.approx(PEAK, rel=1e-4)
    quiet = torch.from_numpy(sine(440, 2, amplitude=0.1))
    assert torch.equal(audio_out.normalize(quiet.clone(), RATE, "clip"), quiet)  # nothing to clip


def test_rms_reaches_minus_18_db():
    out = audio_out.normalize(torch.from_numpy(sine(440, 2, amplitude=0.02, channels=2)), RATE, "rms")
    rms = out.mean(dim=0).pow(2).mean().sqrt().item()
    assert 20 * math.log10(rms) == pytest.approx(-18.0, abs=0.01)
    assert out.abs().max() <= 1.0


def test_loudness_reaches_minus_14_lufs():
    quiet = torch.from_numpy(sine(440, 3, amplitude=0.05, channels=2))
    assert loudness(quiet) < -25
    out = audio_out.normalize(quiet, RATE, "loudness")
    # the soft-clipping compressor (tanh) costs a fraction of a dB at this level
    assert loudness(out) == pytest.approx(-14.0, abs=0.5)
    assert out.abs().max() <= 1.0


def varying(seconds: float, channels: int, seed: int = 0) -> torch.Tensor:
    """Noise whose level swells and falls, silent for its first 0.3 s (below the absolute gate)
    and above full scale at its end (torchaudio's K-weighting clamps there)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * RATE)) / RATE
    wav = 0.1 * torch.randn(channels, t.numel(), generator=g) * (1.05 + torch.sin(2 * math.pi * 0.4 * t))
    wav[:, : int(0.3 * RATE)] = 0
    wav[:, -RATE // 2 :] *= 12
    return wav


@pytest.mark.parametrize("channels", [1, 2])
def test_blockwise_loudness_is_torchaudios(channels, monkeypatch):
    import torchaudio

    monkeypatch.setattr(audio_out, "BLOCK", 5000)  # many blocks, hops across their joins
    for seconds in (0.5, 3.3, 7.01):
        wav = varying(seconds, channels, seed=int(seconds * 10))
        expected = torchaudio.functional.loudness(wav, RATE).item()
        assert audio_out.loudness(wav, RATE) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("strategy", ["peak", "clip", "rms", "loudness"])
def test_blockwise_normalization_is_audiocrafts_in_place(strategy, monkeypatch):
    from audiocraft.data.audio_utils import normalize_audio

    monkeypatch.setattr(audio_out, "BLOCK", 5000)
    wav = varying(4.2, 2)
    expected = normalize_audio(
        wav.clone(),
        strategy=strategy,
        peak_clip_headroom_db=1,
        rms_headroom_db=18,
        loudness_headroom_db=14,
        loudness_compressor=True,
        sample_rate=RATE,
    )
    out = audio_out.normalize(wav, RATE, strategy)
    assert out.data_ptr() == wav.data_ptr()  # no copy of the waveform
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if strategy in ("peak", "clip"):  # the same arithmetic on each sample
        assert torch.equal(out, expected)


def test_silence_stays_silent():
    silent = torch.zeros(2, RATE)
    for strategy in ("loudness", "clip", "peak", "rms"):
        assert torch.equal(audio_out.normalize(silent, RATE, strategy), silent)


def test_non_finite_audio_is_refused():
    bad = torch.zeros(1, RATE)
    bad[0, 5] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        audio_out.normalize(bad, RATE, "peak")


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_encoded_file_decodes_to_the_same_length_rate_and_channels(tmp_path, fmt, channels):
    wav = torch.from_numpy(sine(440, 2.5, amplitude=0.5, channels=channels))
    path = audio_out.write(wav, RATE, fmt, tmp_path)
    assert path == tmp_path / f"output.{fmt}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left
    data, rate = decode(path)
    assert rate == RATE and data.shape[0] == channels
    if fmt == "wav":
        assert data.shape[1] == wav.shape[1]
        np.testing.assert_allclose(data, wav.numpy(), atol=1 / 16000)
    else:  # mp3 adds encoder delay/padding: at most a couple of frames (1152 samples each)
        assert abs(data.shape[1] - wav.shape[1]) <= 2 * 1152 + 529
        # the tone is still there: same RMS within 0.5 dB
        assert 20 * math.log10(data.std() / wav.numpy().std()) == pytest.approx(0, abs=0.5)


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_blockwise_encoding_writes_the_one_shot_bytes(tmp_path, fmt, monkeypatch):
    wav = varying(2.3, 2).clamp(-1, 1)
    whole = audio_out.write(wav, RATE, fmt, tmp_path, stem="whole").read_bytes()
    monkeypatch.setattr(audio_out, "BLOCK", 3001)
    assert audio_out.write(wav, RATE, fmt, tmp_path, stem="blocks").read_bytes() == whole


def test_failed_encoding_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="mono or stereo"):
        audio_out.write(torch.zeros(3, RATE), RATE, "mp3", tmp_path)
    assert list(tmp_path.iterdir()) == []
