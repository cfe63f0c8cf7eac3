"""Normalization strategies (audiocraft's) and in-process wav/mp3 encoding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from audio_helpers import decode, sine
from musicgen_service import audio_out

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
    assert torch.equal(audio_out.normalize(quiet, RATE, "clip"), quiet)  # nothing to clip


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


def test_failed_encoding_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="mono or stereo"):
        audio_out.write(torch.zeros(3, RATE), RATE, "mp3", tmp_path)
    assert list(tmp_path.iterdir()) == []
