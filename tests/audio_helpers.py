"""Test helpers: decode files back with PyAV and measure them."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np


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


def sine(freq: float, seconds: float, rate: int = 32000, amplitude: float = 0.5,
         channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    tone = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([tone] * channels)
