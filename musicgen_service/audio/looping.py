"""How a loop's length and seam are made: a span of whole bars cut on downbeats, stretched to the
exact tempo, its wrap crossfaded with the audio that followed it.

- **Span**: ``bars * beats_per_bar`` beats of the tracked grid (:mod:`.beats`), from the first
  downbeat at or after ``earliest`` (:data:`PRE_ROLL` into the audio when it can be: the time
  stretcher gets audio before the cut to work from) whose span, and the audio after it, fit.
- **Stretch**: from the found tempo to the asked one with Rubber Band (``pedalboard.time_stretch``,
  its high-quality R3 engine; a phase vocoder smears drums), on the span with a beat before it and
  what follows it; the output keeps its start where the input's was, so the downbeat lands on a
  known sample and the loop is cut to exactly ``loop_samples`` from it.
- **Seam**: a loop wraps from its last sample to its first. The audio that followed the span (the
  next bar's first beat, generated after the last one) is the natural continuation of the last
  sample, so the loop's first :data:`SEAM_SECONDS` are an equal-power crossfade from that audio into
  the loop's own: at the wrap the waveform goes on as it was generated (no step, no click), and the
  downbeat stays at sample 0 because both sides of the crossfade start on one.

Without a usable tempo (:func:`.beats.track` gave None, or nothing fits) :func:`fallback` cuts the
exact length at the asked tempo from ``earliest`` with the same seam. NumPy in, NumPy out.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass

import numpy as np

from .beats import Beats

# The crossfade at the wrap: shorter than a sixteenth note at the fastest tempo (50 ms at 300 BPM),
# long enough that two unrelated signals blend without a click.
SEAM_SECONDS = 0.03
# Audio the stretcher gets before the cut when there is some (its analysis window is ~0.1 s): a
# downbeat earlier than this is passed over for the next when that one fits.
PRE_ROLL = 0.25


# How much slower than asked the music may be played and still give a loop from one generation:
# MusicGen keeps the tempo in its prompt's words to a few percent (audiocraft#20: +-5 BPM).
GENERATION_MARGIN = 1.12


def generation_seconds(bpm: float, bars: int, beats_per_bar: int, continuing: bool = False) -> int:
    """Seconds of new audio to generate for one loop: its span at a tempo up to
    :data:`GENERATION_MARGIN` slower than asked, what the seam takes after it and, before it, the
    room to find its first downbeat (anywhere in the first bar; a beat when ``continuing`` a loop,
    whose end is a downbeat)."""
    beat = 60.0 / bpm
    lead = beat if continuing else PRE_ROLL + beats_per_bar * beat
    tail = SEAM_SECONDS + 0.25 * beat + 0.1
    return int(math.ceil(lead + bars * beats_per_bar * beat * GENERATION_MARGIN + tail))


def loop_samples(bpm: float, bars: int, beats_per_bar: int, sample_rate: int) -> int:
    """A loop's exact length: ``bars * beats_per_bar`` beats at ``bpm``, to the nearest sample."""
    return int(round(bars * beats_per_bar * 60.0 / bpm * sample_rate))


def seam_samples(sample_rate: int) -> int:
    return int(round(SEAM_SECONDS * sample_rate))


@dataclass
class Loop:
    wav: np.ndarray  # [C, loop_samples] float32
    found_bpm: tp.Optional[float]  # the tempo the span was played at before stretching (None: fallback)
    start: float  # seconds into the generated audio where the loop's first downbeat was
    stretch: float  # the speed factor applied (1.0: none)


def cut(
    wav: np.ndarray,
    sample_rate: int,
    beats: Beats,
    bpm: float,
    bars: int,
    earliest: float = 0.0,
) -> tp.Optional[Loop]:
    """The loop from ``wav`` [C, T] on ``beats``' grid, stretched to ``bpm``; None if no span of
    whole bars (and the audio the seam needs after it) fits after ``earliest`` seconds."""
    import pedalboard

    rate = float(sample_rate)
    total = wav.shape[-1] / rate
    count = bars * beats.beats_per_bar
    span = count * beats.period
    speed = bpm / beats.bpm  # > 1: the music was slower than asked, so it is sped up
    seam = seam_samples(sample_rate)
    after = (seam + 64) * speed / rate + 0.25 * beats.period  # source seconds needed after the span
    starts = [t for t in beats.downbeats(total) if t >= earliest - 0.25 * beats.period and t >= 0]
    fitting = [t for t in starts if t + span + after <= total]
    if not fitting:
        return None
    with_room = [t for t in fitting if t >= PRE_ROLL]  # audio before the cut, for the stretcher's window
    start = with_room[0] if with_room else fitting[0]
    pre = min(start, beats.period)
    a = int(round((start - pre) * rate))
    b = min(wav.shape[-1], int(math.ceil((start + span + after) * rate)))
    region = np.ascontiguousarray(wav[:, a:b], dtype=np.float32)
    out = region if abs(speed - 1.0) < 1e-4 else pedalboard.time_stretch(region, sample_rate, speed)
    at = int(round((start * rate - a) / speed))
    length = loop_samples(bpm, bars, beats.beats_per_bar, sample_rate)
    if out.shape[-1] < at + length + seam:
        return None
    return Loop(seamed(out[:, at : at + length + seam], length), beats.bpm, start, speed)


def fallback(wav: np.ndarray, sample_rate: int, bpm: float, bars: int, beats_per_bar: int, earliest: float) -> Loop:
    """The exact length at ``bpm`` from ``earliest`` seconds (or as late as still fits), seamed."""
    length = loop_samples(bpm, bars, beats_per_bar, sample_rate)
    seam = seam_samples(sample_rate)
    start = max(0, min(int(round(earliest * sample_rate)), wav.shape[-1] - length - seam))
    piece = wav[:, start : start + length + seam]
    if piece.shape[-1] < length + seam:  # (shorter audio than asked: the generation is sized to avoid it)
        piece = np.pad(piece, ((0, 0), (0, length + seam - piece.shape[-1])))
    return Loop(seamed(np.asarray(piece, np.float32), length), None, start / sample_rate, 1.0)


def seamed(piece: np.ndarray, length: int) -> np.ndarray:
    """``piece`` [C, length + seam]: the loop and the audio that followed it -> the loop [C, length],
    its first ``seam`` samples crossfaded (equal power) from what followed into its own."""
    seam = piece.shape[-1] - length
    loop = piece[:, :length].astype(np.float32, copy=True)
    if seam <= 0:
        return loop
    seam = min(seam, length)
    t = (np.arange(seam, dtype=np.float64) + 0.5) / seam
    fade_in, fade_out = np.sin(0.5 * np.pi * t), np.cos(0.5 * np.pi * t)
    loop[:, :seam] = (loop[:, :seam] * fade_in + piece[:, length : length + seam] * fade_out).astype(np.float32)
    return loop
