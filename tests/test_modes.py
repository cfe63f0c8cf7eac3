"""input_audio on the tiny models: melody conditioning and continuation, at any duration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from audio_helpers import decode, melody, write
from conftest import MONO_MELODY, make_service

from musicgen_service.audio import input_audio as audio_in
from musicgen_service.core.errors import InputError

RATE = 32000
FRAME = 640  # samples per token frame at 50 Hz


@pytest.fixture(scope="module")
def melody_service(tiny_weights):
    """A mono melody model: cheaper than the stereo default, same code path."""
    return make_service(tiny_weights, MONO_MELODY)


@pytest.fixture(scope="module")
def tunes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tunes")
    return {
        "a": write(folder / "a.wav", melody([262, 330, 392, 523] * 2, 0.5, 44100, 2), 44100),
        "b": write(folder / "b.mp3", melody([440, 349, 294, 247] * 2, 0.5, 44100, 2), 44100),
        "mono8k": write(folder / "mono8k.flac", melody([300, 600, 900], 1.0, 8000, 1), 8000),
    }


def generate(service, **inputs):
    req = service.parse(**{"prompt": "jazz", "duration": 2, "seed": 11, **inputs})
    return service.generator.generate(req, service.input_clip(req))


def test_melody_reaches_the_conditioner(melody_service, tunes):
    a1 = generate(melody_service, input_audio=tunes["a"])
    a2 = generate(melody_service, input_audio=tunes["a"])
    b = generate(melody_service, input_audio=tunes["b"])
    none = generate(melody_service)
    assert torch.equal(a1.tokens, a2.tokens)
    assert not torch.equal(a1.tokens, b.tokens)
    assert not torch.equal(a1.tokens, none.tokens)
    assert a1.wav.shape == (1, 2 * RATE)


def test_melody_without_a_prompt(melody_service, tunes):
    path = melody_service.predict(prompt=None, input_audio=str(tunes["mono8k"]), duration=1, seed=1)
    assert decode(path)[0].shape == (1, RATE)


def test_stereo_default_model_melody_to_mp3(service, tunes):
    data, rate = decode(
        service.predict(prompt="jazz", input_audio=str(tunes["b"]), duration=2, output_format="mp3", seed=2)
    )
    assert rate == RATE and data.shape[0] == 2


@pytest.mark.slow
def test_melody_guides_every_extension_window(melody_service, tmp_path):
    # Two 40 s melodies, identical for the first 30 s. The first window (0-30 s) sees only that
    # part; the second window (from 18 s) reads past 30 s, where they differ.
    common = melody([262, 392] * 30, 0.5, RATE)
    a = write(tmp_path / "a.wav", np.concatenate([common, melody([523, 659] * 10, 0.5, RATE)], axis=1), RATE)
    b = write(tmp_path / "b.wav", np.concatenate([common, melody([220, 247] * 10, 0.5, RATE)], axis=1), RATE)
    ga = generate(melody_service, input_audio=a, duration=32)
    gb = generate(melody_service, input_audio=b, duration=32)
    assert ga.tokens.shape[-1] == gb.tokens.shape[-1] == 32 * 50
    window = 30 * 50
    assert torch.equal(ga.tokens[..., :window], gb.tokens[..., :window])
    assert not torch.equal(ga.tokens[..., window:], gb.tokens[..., window:])


def test_model_without_melody_refuses_melody(mono_service, tunes):
    with pytest.raises(InputError, match="input_audio: facebook/musicgen-small has no melody conditioning"):
        mono_service.predict(prompt="x", input_audio=str(tunes["a"]))


def _codec_round_trip(service, wav):
    codec = service.model.compression_model
    with torch.no_grad():
        codes, _ = codec.encode(wav[None])
        return codes, codec.decode(codes, None)[0]


def test_continuation_starts_with_the_prompt(melody_service, tunes):
    clip = audio_in.load(tunes["a"], RATE, 1, start=1, end=3)  # 2 s, resampled 44.1k stereo -> 32k mono
    out = generate(
        melody_service, input_audio=tunes["a"], continuation=True, continuation_start=1, continuation_end=3, duration=3
    )
    # duration is the new music: the output is the 2 s prompt followed by 3 s
    assert out.wav.shape == (1, 5 * RATE)
    codes, round_trip = _codec_round_trip(melody_service, clip.wav)
    assert torch.equal(out.tokens[..., : codes.shape[-1]], codes)  # the prompt's tokens, untouched
    # Its audio is the codec's rendering of the prompt (a random tiny codec: large error vs the
    # original, so compare with the round trip), up to the decoder's right context at the seam.
    head = 2 * RATE - 5 * FRAME
    torch.testing.assert_close(out.wav[:, :head], round_trip[:, :head], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_continuation_past_the_window_and_from_a_long_clip(melody_service, tmp_path):
    long_clip = write(tmp_path / "long.ogg", melody([262, 330, 392, 440] * 9, 1.0, 44100, 2), 44100)  # 36 s
    out = generate(melody_service, input_audio=long_clip, continuation=True, duration=3)
    # the model sees the last 29 s; the first 7 s are kept as they are
    clip = audio_in.load(long_clip, RATE, 1)
    codes, _ = _codec_round_trip(melody_service, clip.wav)
    assert out.tokens.shape[-1] == codes.shape[-1] + 3 * 50
    assert torch.equal(out.tokens[..., : codes.shape[-1]], codes)
    short = generate(melody_service, input_audio=long_clip, continuation=True, continuation_end=4, duration=28)
    assert short.wav.shape[-1] == (4 + 28) * RATE  # 32 s in all: past the 30 s window


def test_continuation_through_predict_with_every_format(service, tunes):
    for fmt in ("wav", "mp3"):
        data, rate = decode(
            service.predict(
                prompt=None, input_audio=str(tunes["mono8k"]), continuation=True, duration=1, output_format=fmt, seed=4
            )
        )
        assert rate == RATE and data.shape[0] == 2
        if fmt == "wav":
            assert data.shape[1] == 4 * RATE  # 3 s of prompt + 1 s


def test_audio_errors_reach_the_user(service, tunes, tmp_path):
    with pytest.raises(InputError, match=r"continuation_start: is 4\.0 s long, so continuation_start \(9 s\)"):
        service.predict(prompt="x", input_audio=str(tunes["a"]), continuation=True, continuation_start=9)
    text = tmp_path / "lyrics.txt"
    text.write_text("la la la\n" * 50)
    with pytest.raises(InputError, match="input_audio: could not be read as audio"):
        service.predict(prompt="x", input_audio=str(text))


def test_continuation_end_past_the_clip_uses_it_to_the_end(service, tunes, capsys):
    generated = generate(service, input_audio=tunes["a"], continuation=True, continuation_end=60, duration=1)
    assert generated.wav.shape[-1] == 5 * RATE
    assert "continuation_end (60 s) is past the end of input_audio (4.0 s long)" in capsys.readouterr().out
