"""Synthetic rhythm at a known tempo, for the beat tracker's and the loop cutter's tests and bench.

Each signal starts ``offset`` seconds before a bar's first beat would be, so the first downbeat is
at a known time that is not 0. Kinds:

- ``click``: a short click on every beat, louder on the bar's first;
- ``drums``: kick on the one (and on beat 3 in 4/4), snare on the back beats, hi-hats on eighths;
- ``swing``: the drums with swung eighths and a little timing jitter;
- ``music``: the drums under sustained chords and a bass line changing each bar, with noise;
- ``noise``: pink-ish noise, no pulse at all.
"""

from __future__ import annotations

import numpy as np


def _decay(rate: int, seconds: float, tau: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.exp(-t / tau)


def _add(out: np.ndarray, at: float, sound: np.ndarray, rate: int) -> None:
    i = int(round(at * rate))
    if i >= out.shape[-1] or i < 0:
        return
    n = min(len(sound), out.shape[-1] - i)
    out[..., i : i + n] += sound[:n]


def signal(
    kind: str,
    bpm: float,
    beats_per_bar: int = 4,
    seconds: float = 12.0,
    rate: int = 32000,
    channels: int = 1,
    offset: float = 0.37,
    seed: int = 0,
) -> np.ndarray:
    """[channels, samples] float32; the first downbeat at ``offset`` seconds (then every bar)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((channels, int(seconds * rate)), np.float32)
    period = 60.0 / bpm
    if kind == "noise":
        white = rng.standard_normal(out.shape[-1])
        pink = np.convolve(white, _decay(rate, 0.01, 0.002), mode="same")
        out[:] = (0.1 * pink / np.abs(pink).max()).astype(np.float32)
        return out
    t = np.arange(int(0.12 * rate)) / rate
    kick = np.sin(2 * np.pi * (55 + 90 * np.exp(-t / 0.02)) * t) * np.exp(-t / 0.06)
    snare = rng.standard_normal(len(t)) * np.exp(-t / 0.04) * 0.5
    hat_t = t[: int(0.03 * rate)]
    hat = np.diff(rng.standard_normal(len(hat_t) + 1)) * np.exp(-hat_t / 0.008) * 0.15
    click = np.sin(2 * np.pi * 1800 * hat_t) * np.exp(-hat_t / 0.004)
    beat = -int(np.ceil(offset / period))  # beats from before the audio begins, so bars start at offset
    while True:
        at = offset + beat * period
        if at >= seconds:
            break
        phase = beat % beats_per_bar
        jitter = rng.normal(0, 0.004) if kind == "swing" else 0.0
        if kind == "click":
            _add(out, at, (1.0 if phase == 0 else 0.45) * click, rate)
        else:
            if phase == 0 or (beats_per_bar == 4 and phase == 2):
                _add(out, at + jitter, (1.0 if phase == 0 else 0.7) * kick, rate)
            if phase % 2 == 1:
                _add(out, at + jitter, snare, rate)
            swing = 0.62 if kind == "swing" else 0.5
            _add(out, at + jitter, hat, rate)
            _add(out, at + swing * period + jitter, 0.7 * hat, rate)
        beat += 1
    if kind == "music":
        n = out.shape[-1]
        time = np.arange(n) / rate
        bar = period * beats_per_bar
        roots = [110.0, 87.31, 130.81, 98.0]  # A2 F2 C3 G2
        index = np.clip(((time - offset) // bar).astype(int) % 4, 0, 3)
        root = np.array(roots)[index]
        pad = sum(np.sin(2 * np.pi * root * r * time) for r in (2.0, 2.52, 3.0)) * 0.05
        bass = np.sin(2 * np.pi * root * time) * 0.15
        out += (pad + bass + 0.01 * rng.standard_normal(n)).astype(np.float32)
    if channels == 2:  # a little width: the hats and noise differ per side
        out[1] = 0.9 * out[1] + 0.02 * rng.standard_normal(out.shape[-1]).astype(np.float32)
    peak = np.abs(out).max()
    return (0.8 * out / peak).astype(np.float32) if peak > 0 else out
