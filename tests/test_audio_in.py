"""Decoding input_audio: formats, rates, channels, slicing, limits and every error message."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from audio_helpers import sine, write

from musicgen_service.audio import input_audio as audio_in
from musicgen_service.core.errors import InputError

RATE = 32000


def dominant_hz(wav: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wav.mean(axis=0)))
    return float(np.argmax(spectrum) * rate / wav.shape[-1])


def fails(path, fragment: str, field: str = "input_audio", **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        audio_in.load(path, RATE, 2, **kwargs)
    assert info.value.fields == [field], info.value
    assert fragment in str(info.value), info.value
    return info.value


CASES = [  # (format, source channels, source rate)
    ("wav", 1, 8000),
    ("wav", 2, 44100),
    ("wav", 6, 48000),
    ("mp3", 1, 8000),
    ("mp3", 2, 44100),
    ("mp3", 2, 48000),
    ("flac", 1, 8000),
    ("flac", 2, 44100),
    ("flac", 6, 48000),
    ("ogg", 1, 8000),
    ("ogg", 2, 44100),
    ("ogg", 2, 48000),
    ("opus", 1, 8000),
    ("opus", 2, 48000),
    ("opus", 6, 48000),
    ("m4a", 1, 8000),
    ("m4a", 2, 44100),
    ("m4a", 6, 48000),
    ("aac", 2, 44100),
    ("aiff", 2, 44100),
    ("webm", 2, 48000),
]


@pytest.mark.parametrize("model_channels", [1, 2])
@pytest.mark.parametrize("fmt, channels, rate", CASES)
def test_formats_rates_and_channels(tmp_path, fmt, channels, rate, model_channels):
    path = write(tmp_path / f"in.{fmt}", sine(440, 2.0, rate, 0.5, channels), rate)
    clip = audio_in.load(path, RATE, model_channels)
    wav = clip.wav.numpy()
    assert wav.dtype == np.float32 and wav.shape[0] == model_channels
    # codecs may add priming/padding: up to two AAC frames (2 x 1024 samples) at 8 kHz
    assert abs(wav.shape[1] / RATE - 2.0) <= 2 * 1024 / 8000, wav.shape
    assert dominant_hz(wav) == pytest.approx(440, abs=2)
    assert 0.1 < np.abs(wav).max() < 1.0


def test_mono_source_feeds_both_sides_of_a_stereo_model(tmp_path):
    clip = audio_in.load(write(tmp_path / "m.wav", sine(300, 1, RATE), RATE), RATE, 2)
    np.testing.assert_array_equal(clip.wav[0].numpy(), clip.wav[1].numpy())


def test_same_rate_wav_is_decoded_exactly(tmp_path):
    source = np.stack([sine(300, 1, RATE)[0], sine(500, 1, RATE)[0]])
    clip = audio_in.load(write(tmp_path / "s.wav", source, RATE), RATE, 2)
    np.testing.assert_allclose(clip.wav.numpy(), source, atol=1 / 32767)


def test_slicing_selects_the_requested_seconds(tmp_path):
    # 1 s at 200 Hz, then 1 s at 600 Hz, then 1 s at 1000 Hz
    source = np.concatenate([sine(f, 1, 44100) for f in (200, 600, 1000)], axis=1)
    path = write(tmp_path / "three.flac", source, 44100)
    middle = audio_in.load(path, RATE, 1, start=1, end=2)
    assert middle.wav.shape == (1, RATE) and middle.start == 1.0
    assert dominant_hz(middle.wav.numpy()) == pytest.approx(600, abs=2)
    tail = audio_in.load(path, RATE, 1, start=2)
    assert tail.wav.shape[1] == RATE and tail.file_seconds == pytest.approx(3.0)
    past_end = audio_in.load(path, RATE, 1, start=1, end=10)  # end past the clip: up to its end
    assert past_end.wav.shape[1] == 2 * RATE and past_end.file_seconds == pytest.approx(3.0)


def test_start_past_the_end_states_the_real_length(tmp_path):
    path = write(tmp_path / "short.wav", sine(440, 4, RATE), RATE)
    fails(path, "is 4.0 s long, so continuation_start (5 s) is past its end", "continuation_start", start=5)
    fails(path, "is 4.0 s long", "continuation_start", start=4, end=9)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a song\n" * 100)
    fails(path, "could not be read as audio")
    noise = tmp_path / "noise.mp3"
    noise.write_bytes(np.random.default_rng(0).bytes(50_000))
    fails(noise, "input_audio")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    fails(tmp_path / "empty.mp3", "the file is empty")
    fails(tmp_path / "nowhere.wav", "could not be read")


def test_no_samples(tmp_path):
    path = tmp_path / "zero.wav"
    path.write_bytes(_wav_header(0))
    fails(path, "contains no audio samples")


def test_truncated_files(tmp_path):
    for fmt in ("wav", "flac"):
        path = write(tmp_path / f"full.{fmt}", sine(440, 4, 44100, 0.5, 2), 44100)
        data = path.read_bytes()
        cut = tmp_path / f"cut.{fmt}"
        cut.write_bytes(data[: len(data) // 2])
        error = fails(cut, "truncated")
        if fmt == "wav":  # the RIFF header still says how long it was
            assert "its header says 4.0 s but only 2.0 s could be decoded" in str(error)
    m4a = write(tmp_path / "full.m4a", sine(440, 4, 44100), 44100).read_bytes()
    (tmp_path / "cut.m4a").write_bytes(m4a[: len(m4a) // 2])
    fails(tmp_path / "cut.m4a", "input_audio")  # the index (moov) is lost: unreadable


def test_oversized_file_is_refused_before_opening(tmp_path):
    big = tmp_path / "big.wav"
    with open(big, "wb") as f:
        f.truncate(audio_in.MAX_BYTES + 1)  # sparse: no disk used
    fails(big, "the limit is 100 MB")


def _wav_header(data_bytes: int, rate: int = 8000, channels: int = 1) -> bytes:
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def test_header_claiming_more_than_the_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "claims.wav"
    path.write_bytes(_wav_header(8000 * 2 * 60 * 20) + b"\0" * 16000)  # says 20 min, holds 1 s
    fails(path, "is 20.0 minutes long; the limit is 10 minutes")


def test_decoding_stops_at_the_limit_when_the_header_says_nothing(tmp_path, monkeypatch):
    # A header without a duration (streams, some containers) cannot be trusted: decoding itself
    # stops once the limit is passed, so memory stays bounded.
    monkeypatch.setattr(audio_in, "MAX_SECONDS", 1.0)
    monkeypatch.setattr(audio_in, "_declared_seconds", lambda path, container, stream: None)
    path = write(tmp_path / "long.wav", sine(440, 5, RATE), RATE)
    fails(path, "is longer than 0 minutes, the limit")


# ------------------------------------------------------------------ hostile files


def test_a_playlist_naming_a_local_file_is_refused_whatever_its_name(tmp_path):
    """FFmpeg left to itself opens an HLS playlist (by its content and a .m3u8 name) and decodes the
    local files it names: their samples would come back in continuation mode."""
    secret = write(tmp_path / "secret.flac", sine(440, 2.0, RATE), RATE)
    playlist = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{}\n#EXT-X-ENDLIST\n"
    for entry in (str(secret), f"file://{secret}"):
        for name in ("list.m3u8", "song.wav", "song.mp3", "song.m4a", "song"):
            path = tmp_path / name
            path.write_text(playlist.format(entry))
            error = fails(path, "playlist")
            assert "could not be read as audio" in str(error)


@pytest.mark.parametrize(
    "name, content, what",
    [
        ("files.ffconcat", "ffconcat version 1.0\nfile '/etc/passwd'\n", "list of files"),
        ("files.txt", "file '/tmp/a.wav'\nfile '/tmp/b.wav'\n", "list of files"),
        ("stream.sdp", "v=0\no=- 0 0 IN IP4 127.0.0.1\nm=audio 5004 RTP/AVP 0\n", "text file"),
        ("frames.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "image"),
        ("cover.jpg", b"\xff\xd8\xff\xe0" + bytes(200), "image"),
        ("sound.au", b".snd" + bytes(200), "not a wav, mp3"),  # a real format, but not one users send
    ],
)
def test_lists_protocols_images_and_other_formats_are_refused(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    fails(path, what)


def test_the_container_is_recognised_by_content_not_by_name(tmp_path):
    flac = write(tmp_path / "a.flac", sine(440, 1.0, RATE), RATE)
    misnamed = tmp_path / "a.mp3"
    misnamed.write_bytes(flac.read_bytes())
    assert audio_in.container(misnamed) == "flac"
    assert audio_in.load(misnamed, RATE, 1).wav.shape == (1, RATE)
    # an ID3v2 tag before the audio (taggers put one before mp3, sometimes flac)
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 20]) + bytes(20)
    tagged = tmp_path / "tagged.flac"
    tagged.write_bytes(tag + flac.read_bytes())
    assert audio_in.container(tagged) == "flac"
    mp3 = write(tmp_path / "b.mp3", sine(440, 1.0, 44100), 44100)
    assert audio_in.container(mp3) == "mp3"


def test_a_stream_that_changes_rate_and_channels_part_way_decodes(tmp_path):
    """Two ADTS aac streams spliced (mono 44.1 kHz, then stereo 48 kHz: frames change rate and layout
    part way): PyAV's resampler raised a raw ValueError at the change (bench/fuzz_audio.py found it);
    it is set up again for the new frames."""
    first = write(tmp_path / "a.aac", sine(440, 1.0, 44100, 0.5, 1), 44100).read_bytes()
    second = write(tmp_path / "b.aac", sine(660, 1.0, 48000, 0.5, 2), 48000).read_bytes()
    spliced = tmp_path / "spliced.aac"
    spliced.write_bytes(first + second)
    clip = audio_in.load(spliced, RATE, 2)
    assert abs(clip.wav.shape[-1] - 2 * RATE) < 0.1 * RATE
    assert dominant_hz(clip.wav[:, : RATE // 2].numpy()) == pytest.approx(440, abs=5)
    assert dominant_hz(clip.wav[:, -RATE // 2 :].numpy()) == pytest.approx(660, abs=5)


def _riff(fmt_rate: int, block_align: int, data: bytes, data_size: int, extra: bytes = b"") -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, fmt_rate, fmt_rate * block_align, block_align, 16)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", data_size) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


CRAFTED = {  # (bench/fuzz_audio.py found these; bench/work/fuzz-crashes/memory-README.txt)
    # a 1 Hz header rate: the resampler multiplied every packet 32,000 times before any length check
    "rate-1hz.wav": (_riff(1, 4096, bytes(64 << 10), 0xFFFFFFFE), "its sample rate is 1 Hz"),
    # an INFO tag declaring 2 GB in a 32 KB file: FFmpeg allocated and zeroed it inside av.open
    "info-tag.wav": (
        _riff(
            16000,
            2,
            bytes(32 << 10),
            32 << 10,
            extra=b"LIST" + struct.pack("<I", 0xFFFFFFF0) + b"INFO" + b"INAM" + struct.pack("<I", 0x7FFFFF00) + b"name",
        ),
        "chunk declares",
    ),
}


def test_crafted_wav_headers_are_refused_in_bounded_memory(tmp_path):
    """In a fresh process, after a good file warmed the decoder up: each crafted file refused, and the
    process's peak grows by less than 100 MB over both (they grew it by 1.8 and 2.1 GB)."""
    import json
    import os
    import subprocess
    import sys

    good = write(tmp_path / "good.wav", sine(440, 1.0, RATE), RATE)
    for name, (data, _) in CRAFTED.items():
        (tmp_path / name).write_bytes(data)
    script = f"""
import json, resource
from musicgen_service.audio import input_audio as audio_in
from musicgen_service.core.errors import InputError
audio_in.load({str(good)!r}, 32000, 2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {{}}
for name in {sorted(CRAFTED)!r}:
    try:
        audio_in.load({str(tmp_path)!r} + "/" + name, 32000, 2)
        out[name] = ["decoded", 0]
    except InputError as exc:
        out[name] = [str(exc), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024]
print(json.dumps(out))
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, fragment) in CRAFTED.items():
        message, grown = results[name]
        assert fragment in message, results
        assert grown < 100, results


def test_a_codec_without_a_decoder_is_refused(tmp_path):
    data = bytearray(_riff(16000, 2, bytes(32000), 32000))
    data[20:22] = struct.pack("<H", 0x1234)  # the fmt chunk's format tag: a codec no one decodes
    path = tmp_path / "odd.wav"
    path.write_bytes(bytes(data))
    fails(path, "no decoder")
