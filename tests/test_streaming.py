"""The streaming model's service (musicgen_service/serving/streaming.py, Service.stream) on the tiny set: chunks
in order, their audio the final file's up to the documented gain, no seams, every mode, the final item
the main model's very file, and what happens on errors. Through the real server: test_streaming_server.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from audio_helpers import decode, melody, write
from conftest import MONO_TEXT, STEREO_MELODY, make_service

from musicgen_service.audio import output_audio as audio_out
from musicgen_service.core.errors import InputError
from musicgen_service.serving import streaming

RATE = 32000


@pytest.fixture(scope="module")
def text(tiny_weights):
    return make_service(tiny_weights, MONO_TEXT, decoder="exact")


@pytest.fixture(scope="module")
def stereo(tiny_weights):
    return make_service(tiny_weights, STEREO_MELODY, decoder="exact")


def streamed(service, **inputs):
    items = list(service.stream(service.parse(**inputs)))
    return items[:-1], items[-1]


def snr_after_gain(reference: np.ndarray, other: np.ndarray) -> float:
    """SNR (dB) of ``other`` against ``reference`` after the least-squares gain is applied to it."""
    gain = float((reference * other).sum() / max((other * other).sum(), 1e-12))
    noise = reference - gain * other
    return 10 * math.log10((reference**2).sum() / max((noise**2).sum(), 1e-20))


def joined(chunks) -> np.ndarray:
    return np.concatenate([decode(p)[0] for p in chunks], axis=-1)


@pytest.mark.parametrize("strategy, min_snr", [("clip", 80.0), ("peak", 80.0), ("rms", 60.0), ("loudness", 60.0)])
def test_chunks_are_the_final_file_up_to_a_fixed_gain(text, strategy, min_snr):
    chunks, final = streamed(text, prompt="lo-fi beat", duration=5, seed=3, normalization_strategy=strategy)
    assert [p.name for p in chunks] == [f"chunk-{i:04d}.wav" for i in range(len(chunks))]
    lengths = [decode(p)[0].shape[-1] for p in chunks]
    assert lengths[0] == streaming.FIRST_CHUNK_SECONDS * RATE
    assert all(n == streaming.CHUNK_SECONDS * RATE for n in lengths[1:-1]) and 0 < lengths[-1] <= 2 * RATE
    audio, ref = joined(chunks), decode(final)[0]
    assert audio.shape == ref.shape == (1, 5 * RATE)
    snr = snr_after_gain(ref, audio)
    print(f"{strategy}: chunks vs final file, SNR after gain matching {snr:.1f} dB")
    assert snr >= min_snr, snr  # (16-bit files: quantization alone bounds it near 90 dB)


def test_the_final_item_is_the_main_models_file(text):
    _, final = streamed(text, prompt="jazz", duration=3, seed=9, output_format="mp3")
    main = text.predict(prompt="jazz", duration=3, seed=9, output_format="mp3")
    assert final.suffix == ".mp3" and final.read_bytes() == main.read_bytes()


def test_no_seam_at_the_joins(text):
    """The chunks are one levelled decode cut in pieces: joined, they equal the levelling applied to
    the whole decode (up to 16-bit rounding), so a join is as smooth as any other sample."""
    chunks, _ = streamed(text, prompt="ambient", duration=4, seed=5, normalization_strategy="peak")
    svc = text
    req = svc.parse(prompt="ambient", duration=4, seed=5)
    tokens = svc.generator.tokens(svc.generator.condition(req))
    whole = svc.generator.to_audio(tokens)[0]
    level = audio_out.fixed_levelling(whole[:, :RATE], RATE, "peak")
    expected = level(whole).numpy()
    assert np.abs(joined(chunks) - expected).max() < 1.5 / 32767


def test_mp3_chunks_are_one_stream(text, tmp_path):
    chunks, _ = streamed(text, prompt="lo-fi", duration=4, seed=2, output_format="mp3")
    assert [p.suffix for p in chunks] == [".mp3"] * len(chunks)
    stream = tmp_path / "all.mp3"
    stream.write_bytes(b"".join(p.read_bytes() for p in chunks))
    audio, rate = decode(stream)
    assert rate == RATE and abs(audio.shape[-1] - 4 * RATE) <= 2 * 1152 + 529


@pytest.mark.slow
def test_melody_and_continuation_stream(stereo, tmp_path):
    tune = write(tmp_path / "tune.wav", melody([262, 392, 330, 523], 0.75, 44100, 2), 44100)
    chunks, final = streamed(stereo, prompt="synth", input_audio=str(tune), duration=3, seed=4)
    assert decode(final)[0].shape == (2, 3 * RATE) and joined(chunks).shape == (2, 3 * RATE)
    # continuation: the prompt's audio comes first, in the chunks as in the final file
    chunks, final = streamed(stereo, prompt="synth", input_audio=str(tune), continuation=True, duration=2, seed=4)
    ref = decode(final)[0]
    audio = joined(chunks)
    assert ref.shape == audio.shape == (2, 5 * RATE)
    assert snr_after_gain(ref, audio) > 60


@pytest.mark.slow
def test_past_the_window_every_extension_window_streams(text):
    """40 s: audiocraft's windows (18 s stride); the chunks follow each window's new frames."""
    chunks, final = streamed(text, prompt="long", duration=40, seed=1, normalization_strategy="rms")
    ref, audio = decode(final)[0], joined(chunks)
    assert ref.shape == audio.shape == (1, 40 * RATE)
    assert snr_after_gain(ref, audio) >= 80


def test_mbd_is_refused_with_a_reason(text):
    with pytest.raises(InputError, match="multi_band_diffusion: the streaming model decodes with EnCodec"):
        list(text.stream(text.parse(prompt="x", duration=1, multi_band_diffusion=True)))


def test_a_failure_after_some_chunks_sends_no_final_file(text, monkeypatch):
    def broken(request, tokens):
        raise RuntimeError("disk full")

    monkeypatch.setattr(text, "_finish", broken)
    got = []
    with pytest.raises(RuntimeError, match="disk full"):
        for item in text.stream(text.parse(prompt="x", duration=3, seed=1)):
            got.append(item)
    assert got and all(p.name.startswith("chunk-") for p in got)


@pytest.mark.slow
def test_chunks_are_cut_while_generating(text):
    """The first chunk arrives before the tokens are all generated."""
    import time

    start = time.perf_counter()
    it = text.stream(text.parse(prompt="x", duration=10, seed=1))
    first = next(it)
    first_at = time.perf_counter() - start
    rest = list(it)
    total = time.perf_counter() - start
    assert first.name == "chunk-0000.wav" and rest[-1].suffix == ".wav"
    assert first_at < 0.5 * total, (first_at, total)
