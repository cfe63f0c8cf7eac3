"""The real Predictor on the tiny model set: text-to-music end to end, every option."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_helpers import decode
from conftest import MONO_TEXT, STEREO_MELODY, make_service

from musicgen_service.core.errors import InputError
from musicgen_service.weights.hub import WeightsMissingError

ROOT = Path(__file__).resolve().parent.parent
RATE = 32000
PEAK = 10 ** (-1 / 20)


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    from predict import Predictor

    p = Predictor()
    p.setup()  # Settings.from_env(): MUSICGEN_WEIGHTS points at the tiny set, default model
    return p


def run(predictor, **inputs):
    defaults = dict(
        prompt="lo-fi beat",
        input_audio=None,
        duration=2,
        continuation=False,
        continuation_start=0,
        continuation_end=None,
        multi_band_diffusion=False,
        normalization_strategy="loudness",
        top_k=250,
        top_p=0.0,
        temperature=1.0,
        classifier_free_guidance=3,
        output_format="wav",
        seed=1,
    )
    return asyncio.run(predictor.predict(**{**defaults, **inputs}))  # async, as Cog runs it


def tokens(service, **inputs):
    req = service.parse(**{"prompt": "lo-fi beat", "duration": 1, **inputs})
    return service.generator.generate(req).tokens


def test_setup_loads_the_default_model(predictor):
    model = predictor.service.model
    assert predictor.service.settings.model == STEREO_MELODY
    assert (model.sample_rate, model.audio_channels, model.frame_rate, model.max_duration) == (RATE, 2, 50, 30)


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_text_to_music_file(predictor, fmt):
    path = run(predictor, output_format=fmt, duration=3)
    assert path.suffix == f".{fmt}" and path.is_file() and path.name.startswith("musicgen-")
    data, rate = decode(path)
    assert rate == RATE and data.shape[0] == 2
    if fmt == "wav":
        assert data.shape[1] == 3 * RATE
    else:
        assert abs(data.shape[1] - 3 * RATE) <= 2 * 1152 + 529
    assert np.abs(data).max() > 0.05  # not silence


def test_mono_model_writes_mono(mono_service):
    data, rate = decode(mono_service.predict(prompt="folk", duration=1, seed=3))
    assert (data.shape, rate) == ((1, RATE), RATE)


def test_same_seed_same_audio_and_different_seeds_differ(predictor):
    a = decode(run(predictor, seed=7))[0]
    b = decode(run(predictor, seed=7))[0]
    c = decode(run(predictor, seed=8))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_seed_zero_is_a_real_seed(predictor):
    np.testing.assert_array_equal(decode(run(predictor, seed=0))[0], decode(run(predictor, seed=0))[0])


def test_seed_is_logged_and_random_when_absent(predictor, capsys):
    run(predictor, seed=1234)
    out = capsys.readouterr().out
    assert "seed: 1234" in out and "generated 2.0 s / 2.0 s of audio (100%)" in out
    run(predictor, seed=None)
    assert "(random)" in capsys.readouterr().out
    run(predictor, seed=-1)
    assert "(random)" in capsys.readouterr().out


def test_sampling_parameters_reach_audiocraft(mono_service, monkeypatch):
    # top_k=1 keeps the most likely token: every one sampled is a maximum of its distribution (with
    # reduced-precision logits several tokens can tie for it, and the seed picks among those).
    from musicgen_service.decoding import loop

    seen = []
    sample = loop.sample

    def recording(logits, *args):
        out = sample(logits.clone(), *args)
        seen.append((logits, out))
        return out

    monkeypatch.setattr(loop, "sample", recording)
    tokens(mono_service, top_k=1, seed=1)
    monkeypatch.undo()
    assert seen and all(
        torch.equal(logits.gather(-1, out), logits.max(-1, keepdim=True).values) for logits, out in seen
    )
    # a tiny top_p keeps exactly one token (the first in sorted order, ties or not): the seed no
    # longer matters.
    assert torch.equal(tokens(mono_service, top_p=1e-9, seed=1), tokens(mono_service, top_p=1e-9, seed=2))
    base = tokens(mono_service, seed=5)
    assert not torch.equal(base, tokens(mono_service, seed=6))
    # with the same seed, each of these changes the distribution sampled from
    assert not torch.equal(base, tokens(mono_service, seed=5, top_k=10))
    assert not torch.equal(base, tokens(mono_service, seed=5, top_p=0.5))
    assert not torch.equal(base, tokens(mono_service, seed=5, temperature=0.3))
    assert not torch.equal(base, tokens(mono_service, seed=5, classifier_free_guidance=0))
    assert not torch.equal(base, tokens(mono_service, seed=5, prompt="heavy metal"))


def test_normalization_strategies(predictor):
    import torchaudio

    peak, _ = decode(run(predictor, normalization_strategy="peak"))
    assert np.abs(peak).max() == pytest.approx(PEAK, abs=2e-4)
    clip, _ = decode(run(predictor, normalization_strategy="clip"))
    assert np.abs(clip).max() <= PEAK + 1e-4
    rms, _ = decode(run(predictor, normalization_strategy="rms"))
    assert 20 * math.log10(np.sqrt((rms.mean(axis=0) ** 2).mean())) == pytest.approx(-18, abs=0.2)
    loud, _ = decode(run(predictor, normalization_strategy="loudness"))
    lufs = torchaudio.transforms.Loudness(RATE)(torch.from_numpy(loud)).item()
    assert lufs == pytest.approx(-14, abs=1.0)


@pytest.mark.slow
def test_longer_than_the_window_uses_windowed_extension(mono_service, capsys):
    path = mono_service.predict(prompt="ambient", duration=33, seed=2)
    data, rate = decode(path)
    assert (data.shape, rate) == ((1, 33 * RATE), RATE)
    out = capsys.readouterr().out
    assert "generated 33.0 s / 33.0 s of audio (100%)" in out


def test_each_prediction_gets_a_fresh_folder_and_the_previous_output_stays(predictor):
    first = run(predictor)
    second = run(predictor)
    assert first.parent != second.parent
    assert first.is_file() and second.is_file()  # the previous file may still be being delivered


def test_previous_output_as_the_next_input_audio(predictor):
    """A user continuing the music just generated: the previous output, in-process, as input_audio."""
    first = run(predictor, duration=2, seed=3)
    second = run(predictor, input_audio=first, continuation=True, duration=1, seed=4)
    data, _ = decode(second)
    assert data.shape == (2, 3 * RATE)
    first_again, _ = decode(first)
    assert first_again.shape == (2, 2 * RATE)


def test_bad_input_fails_before_generation(predictor, capsys):
    with pytest.raises(InputError, match="duration: must be between 1 and 300 seconds"):
        run(predictor, duration=0)
    assert "seed:" not in capsys.readouterr().out


def test_local_checkpoint_folder_as_model(tiny_weights):
    from musicgen_service.weights.hub import musicgen_folder

    folder = musicgen_folder(tiny_weights, MONO_TEXT)
    service = make_service(tiny_weights, str(folder))
    data, _ = decode(service.predict(prompt="a fine-tune", duration=1, seed=1))
    assert data.shape == (1, RATE)


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(WeightsMissingError) as info:
        make_service(tmp_path)
    assert f"{STEREO_MELODY}/state_dict.bin" in str(info.value)
    assert "script/download-weights" in str(info.value)


def test_missing_conditioner_weights_are_named(tiny_weights, tmp_path):
    from musicgen_service.weights import hub as weights

    src = weights.musicgen_folder(tiny_weights, STEREO_MELODY)
    weights.write_repo(tmp_path, STEREO_MELODY, {f: src / f for f in weights.MUSICGEN_FILES})
    with pytest.raises(WeightsMissingError) as info:
        make_service(tmp_path)
    assert "t5-base/spiece.model" in str(info.value)
    assert "adefossez/HTDemucs/htdemucs.yaml" in str(info.value)


@pytest.mark.slow  # the script in a fresh process (~15 s); test_command_line_mp3_and_errors runs it in-process
def test_command_line_predict_writes_playable_files(tiny_weights, tmp_path):
    env = {**os.environ, "MUSICGEN_WEIGHTS": str(tiny_weights)}
    out = tmp_path / "song.wav"
    proc = subprocess.run(
        [
            str(ROOT / "script" / "predict"),
            "-i",
            "prompt=lo-fi beat",
            "-i",
            "duration=2",
            "-i",
            "seed=3",
            "-o",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "seed: 3" in proc.stdout
    data, rate = decode(out)
    assert (data.shape, rate) == ((2, 2 * RATE), RATE)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("MUSICGEN_WEIGHTS", "error: weights: the model facebook/musicgen-stereo-melody-large needs"),
        (
            "MUSICGEN_DECODER",
            "error: MUSICGEN_DECODER must be one of auto, exact, fp16, bf16, int8, int8dyn, stock, fast; got 'turbo'",
        ),
    ],
)
def test_command_line_setup_problems_are_one_line(tmp_path, setting, message):
    value = str(tmp_path) if setting == "MUSICGEN_WEIGHTS" else "turbo"  # an empty folder; a bad value
    proc = subprocess.run(  # --no-download: the weights are not fetched on first use (test_first_use.py)
        [str(ROOT / "script" / "predict"), "--no-download", "-i", "prompt=jazz"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, setting: value},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    if setting == "MUSICGEN_WEIGHTS":
        assert "Run `script/download-weights`" in proc.stderr


def test_command_line_mp3_and_errors(tiny_weights, tmp_path, monkeypatch, capsys):
    from musicgen_service.tools import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["-i", "prompt=jazz", "-i", "duration=1", "-i", "output_format=mp3"]) == 0
    assert (tmp_path / "output.mp3").is_file() and decode(tmp_path / "output.mp3")[1] == RATE
    assert cli.main(["-i", "prompt=jazz", "-i", "top_p=3"]) == 2
    assert "top_p: must be between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown input 'tempo'"):
        cli.main(["-i", "tempo=120"])
    with pytest.raises(SystemExit, match="input duration='long'"):
        cli.main(["-i", "duration=long"])
