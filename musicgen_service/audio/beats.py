"""Where the beats and the bars are in generated audio: a tempo grid fitted near the tempo asked for.

A loop needs one steady tempo and the first beat of a bar, not a beat tracker's every local drift,
and the tempo is known to within a few percent (it was asked for in the prompt). So the beats are
found by fitting a constant grid: librosa's onset strength (a spectral-flux envelope), then every
tempo within :data:`TEMPO_RANGE` of the one asked for and every phase scored by the envelope's
mean on the grid's beats above its mean over the audio; the best grid is refined by least squares
on the envelope's peak near each beat. The downbeat is the phase (of ``beats_per_bar``) whose beats
carry the most low-frequency onset energy (the kick on the one), the usual heuristic in the
absence of a trained model.

Why not a beat tracker: ``bench/beats.py`` compares this fit with librosa's dynamic-programming
``beat_track`` (given the same tempo prior) and its predominant local pulse (``plp``) on click and
drum tracks at 60-180 BPM (3/4, 4/4, swing, noise, music-like mixes) and on noise, the results in
bench/results/beats.md. Trackers with trained downbeat models (madmom, BeatNet, beat_this) either
no longer install on this Python and NumPy or download their weights at run time.

:func:`track` returns None when no grid stands out of the envelope (:data:`MIN_CONTRAST`): noise,
or music without a pulse near that tempo. Everything here is NumPy and librosa on the CPU.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import numpy as np

# How far from the tempo asked for the music may be (a ratio each way): MusicGen keeps the tempo
# in its prompt's words to about +-5% (audiocraft#20); a wider search risks the octave's neighbours.
TEMPO_RANGE = 1.2
# A grid's contrast: the envelope's mean on its beats over its mean over all the audio (a half-beat
# offset is no reference: eighth-note hi-hats sit there). On the tests' tracks (tests/rhythm.py):
# clicks 24-72, drums 10-36, a music-like mix 3.5-4.5, noise 1.16-1.33; below this, no tempo.
MIN_CONTRAST = 1.6
SEARCH_SECONDS = 30.0  # the grid's search; its refinement runs over all the audio
HOP = 128  # onset envelope hop (4 ms at 32 kHz)
N_FFT = 512  # (16 ms: a beat's onset is placed within a few ms)
LOW_HZ = 200.0  # the downbeat's accent band: kick drum and bass


@dataclass(frozen=True)
class Beats:
    """A steady beat grid in seconds: beat ``k`` is at ``first + k * period``."""

    first: float  # seconds of the first beat in the audio
    period: float  # seconds per beat
    downbeat: int  # index of the first beat that starts a bar (0 <= downbeat < beats_per_bar)
    beats_per_bar: int
    contrast: float  # the envelope on the beats over its mean (see MIN_CONTRAST)

    @property
    def bpm(self) -> float:
        return 60.0 / self.period

    def time(self, k: float) -> float:
        return self.first + k * self.period

    def downbeats(self, seconds: float) -> tp.List[float]:
        """Times of the bars' first beats within ``seconds`` of audio."""
        out, k = [], self.downbeat
        while self.time(k) < seconds:
            out.append(self.time(k))
            k += self.beats_per_bar
        return out


def envelopes(wav: np.ndarray, sample_rate: int) -> tp.Tuple[np.ndarray, np.ndarray, float]:
    """The onset envelope of [C, T] (or [T]) audio (librosa's spectral flux of the log-mel
    spectrogram: loudness-invariant, so quiet hi-hats count as beats), the accent envelope (the
    positive flux of linear power in the low band, where the kick on the one is louder than the
    other beats; of every band when the low band is silent), and frames per second."""
    import librosa

    mono = np.asarray(wav, dtype=np.float32)
    if mono.ndim == 2:
        mono = mono.mean(axis=0)
    mel = librosa.feature.melspectrogram(y=mono, sr=sample_rate, hop_length=HOP, n_fft=N_FFT, n_mels=64, fmax=8000)
    onset = librosa.onset.onset_strength(S=librosa.power_to_db(mel), sr=sample_rate, hop_length=HOP, n_fft=N_FFT)
    freqs = librosa.mel_frequencies(n_mels=64, fmax=8000)
    band = mel[freqs <= LOW_HZ].sum(axis=0)
    if band.max() <= 1e-3 * mel.sum(axis=0).max():
        band = mel.sum(axis=0)
    accent = np.maximum(0.0, np.diff(band, prepend=band[:1]))
    return onset, accent[: len(onset)], sample_rate / HOP


def _on_grid(env: np.ndarray, starts: np.ndarray, period: float) -> np.ndarray:
    """Mean of ``env`` (linearly interpolated) on grids ``start + k * period`` for each start."""
    count = int((len(env) - 1 - starts.max()) // period) + 1
    if count < 2:
        return np.zeros(len(starts))
    points = starts[:, None] + period * np.arange(count)[None, :]
    return np.interp(points, np.arange(len(env)), env).mean(axis=1)


def track(wav: np.ndarray, sample_rate: int, bpm: float, beats_per_bar: int) -> tp.Optional[Beats]:
    """The beat grid of ``wav`` near ``bpm`` and its bars' phase, or None if no tempo stands out."""
    onset, accent, fps = envelopes(wav, sample_rate)
    if len(onset) < 8 or not np.isfinite(onset).all() or onset.max() <= 0:
        return None
    # the grid is searched on the first SEARCH_SECONDS, in tempo steps fine enough that a grid a step
    # off drifts by at most a frame over them (a coarser search misses the peak: at 0.2% steps over
    # 20 s of swing, a grid at 5/6 of the tempo scored higher than the nearest step to the true one)
    head = onset[: int(SEARCH_SECONDS * fps)]
    env = head - head.mean()  # (a steady floor would favour grids with more points)
    steps = int(np.clip(np.ceil(2 * np.log(TEMPO_RANGE) * len(env)), 160, 8000))
    best = (-np.inf, 0.0, 0.0)
    for tempo in np.geomspace(bpm / TEMPO_RANGE, bpm * TEMPO_RANGE, steps):
        period = 60.0 * fps / tempo
        starts = np.arange(0.0, period, 0.5)
        scores = _on_grid(env, starts, period)
        i = int(np.argmax(scores))
        if scores[i] > best[0]:
            best = (scores[i], period, starts[i])
    _, period, start = best
    if period == 0.0:
        return None
    on = _on_grid(onset, np.array([start]), period)[0]
    contrast = float(on / onset.mean())
    if contrast < MIN_CONTRAST:
        return None
    first, period = _refine(head, start, period)
    if len(onset) > len(head):  # then over the whole audio, from the grid the head gave
        first, period = _refine(onset, first, period)
    downbeat = _downbeat(accent, first, period, beats_per_bar)
    return Beats(
        first=first / fps,
        period=period / fps,
        downbeat=downbeat,
        beats_per_bar=beats_per_bar,
        contrast=contrast,
    )


def _refine(env: np.ndarray, start: float, period: float) -> tp.Tuple[float, float]:
    """Least-squares grid through the envelope's peak within an eighth of a beat of each beat."""
    reach = max(1, int(period / 8))
    ks, peaks = [], []
    k = 0
    while start + k * period < len(env) - 1:
        center = int(round(start + k * period))
        lo, hi = max(0, center - reach), min(len(env), center + reach + 1)
        j = lo + int(np.argmax(env[lo:hi]))
        if 0 < j < len(env) - 1:  # sub-frame peak (a parabola through three points)
            a, b, c = env[j - 1], env[j], env[j + 1]
            den = a - 2 * b + c
            peaks.append(j + (0.5 * (a - c) / den if den != 0 else 0.0))
        else:
            peaks.append(float(j))
        ks.append(k)
        k += 1
    if len(ks) < 3:
        return start, period
    slope, intercept = np.polyfit(np.array(ks, float), np.array(peaks), 1)
    if not (0.9 * period < slope < 1.1 * period):  # a fit pulled away by stray peaks: keep the grid
        return start, period
    while intercept - slope > -0.5:  # the earliest beat within the audio
        intercept -= slope
    while intercept < -0.5:
        intercept += slope
    return float(intercept), float(slope)


def _downbeat(accent: np.ndarray, first: float, period: float, beats_per_bar: int) -> int:
    """The bar's phase: the beat class whose beats have the strongest accent (the envelope's
    largest value within a sixteenth of a beat of each beat)."""
    reach = max(1, int(period / 4))
    values = []
    k = 0
    while first + k * period < len(accent) - 1:
        center = int(round(first + k * period))
        values.append(accent[max(0, center - reach) : center + reach + 1].max())
        k += 1
    beats = np.array(values)
    totals = [beats[p::beats_per_bar].mean() if len(beats[p::beats_per_bar]) else 0.0 for p in range(beats_per_bar)]
    return int(np.argmax(totals))
