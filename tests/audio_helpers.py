"""Test helpers: write audio files in many formats (PyAV / soundfile), decode them back."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np

# format -> (container, codec, sample format); ogg/vorbis is written by soundfile (libsndfile).
FORMATS = {
    "wav": ("wav", "pcm_s16le", "s16"),
    "mp3": ("mp3", "libmp3lame", "fltp"),
    "flac": ("flac", "flac", "s16"),
    "opus": ("ogg", "libopus", "flt"),
    "m4a": ("ipod", "aac", "fltp"),
    "aac": ("adts", "aac", "fltp"),
    "aiff": ("aiff", "pcm_s16be", "s16"),
    "webm": ("webm", "libopus", "flt"),
}


def write(path: Path, wav: np.ndarray, rate: int) -> Path:
    """Encode float32 [channels, samples] to ``path``; the suffix picks the format."""
    fmt = path.suffix.lstrip(".")
    if fmt == "ogg":
        import soundfile

        soundfile.write(str(path), wav.T, rate, format="OGG", subtype="VORBIS")
        return path
    import av

    container_format, codec, sample_format = FORMATS[fmt]
    channels = wav.shape[0]
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if sample_format.startswith("s16"):
            data = np.round(np.clip(wav, -1, 1) * 32767).astype(np.int16)
        else:
            data = wav.astype(np.float32)
        if not sample_format.endswith("p"):
            data = data.T.reshape(1, -1)  # packed: interleaved samples in one plane
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=sample_format, layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def decode(path: tp.Union[str, Path]) -> tp.Tuple[np.ndarray, int]:
    """Any audio file -> (float32 [channels, samples], sample rate), via PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        chunks = []
        for frame in container.decode(stream):
            array = frame.to_ndarray()
            if frame.format.is_planar:
                chunks.append(array)
            else:  # interleaved: [1, samples * channels]
                chunks.append(array.reshape(-1, len(frame.layout.channels)).T)
    data = np.concatenate(chunks, axis=1)
    if data.dtype == np.int16:
        data = data.astype(np.float32) / 32768.0
    return data.astype(np.float32), rate


def sine(freq: float, seconds: float, rate: int = 32000, amplitude: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    tone = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([tone] * channels)


def melody(notes: tp.Sequence[float], note_seconds: float = 0.5, rate: int = 32000, channels: int = 1) -> np.ndarray:
    """A sequence of sine notes (Hz): something with a chroma that changes over time."""
    return np.concatenate([sine(f, note_seconds, rate, 0.4, channels) for f in notes], axis=1)
