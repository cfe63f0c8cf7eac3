"""Beat trackers that run offline, compared on synthetic rhythm at known tempi (the tests' tracks):
this project's grid fit (musicgen_service/audio/beats.py) against librosa's ``beat_track`` (dynamic
programming, given the asked tempo as its prior) and librosa's predominant local pulse (``plp``,
with a prior around the asked tempo).

    python bench/beats.py                  # writes bench/results/beats.{md,json}

Tracks: click, drums, swing (swung eighths, timing jitter), music (drums under chords and a bass
line, with noise) at 60, 90, 120, 150 and 180 BPM in 3/4 and 4/4, 12 s, the first downbeat at
0.43 s; each asked 4% off its true tempo. And noise, which has no tempo. Per tracker: the median
tempo error, beats found within 70 ms of a true beat (F-measure, as mir_eval's default window),
the first downbeat within 30 ms (the grid fit only: the others find no bars), how often noise gets a
tempo, and the time per track.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # rhythm: the test suite's synthetic tracks

RATE = 32000
OFFSET = 0.43


def f_measure(found: np.ndarray, truth: np.ndarray, window: float = 0.07) -> float:
    if len(found) == 0 or len(truth) == 0:
        return 0.0
    used = np.zeros(len(truth), bool)
    hits = 0
    for t in found:
        i = int(np.argmin(np.abs(truth - t)))
        if not used[i] and abs(truth[i] - t) <= window:
            used[i] = True
            hits += 1
    precision, recall = hits / len(found), hits / len(truth)
    return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)


def grid(
    wav: np.ndarray, bpm: float, beats_per_bar: int
) -> tp.Tuple[tp.Optional[float], np.ndarray, tp.Optional[float]]:
    from musicgen_service.audio import beats

    found = beats.track(wav, RATE, bpm, beats_per_bar)
    if found is None:
        return None, np.array([]), None
    seconds = wav.shape[-1] / RATE
    times = np.array([found.time(k) for k in range(int((seconds - found.first) / found.period) + 1)])
    return found.bpm, times, found.time(found.downbeat)


def beat_track(wav: np.ndarray, bpm: float, beats_per_bar: int) -> tp.Tuple[tp.Optional[float], np.ndarray, None]:
    import librosa

    tempo, times = librosa.beat.beat_track(y=wav.mean(axis=0), sr=RATE, start_bpm=bpm, units="time", hop_length=256)
    return float(np.atleast_1d(tempo)[0]), np.asarray(times), None


def plp(wav: np.ndarray, bpm: float, beats_per_bar: int) -> tp.Tuple[tp.Optional[float], np.ndarray, None]:
    import librosa

    y = wav.mean(axis=0)
    env = librosa.onset.onset_strength(y=y, sr=RATE, hop_length=256)
    pulse = librosa.beat.plp(onset_envelope=env, sr=RATE, hop_length=256, tempo_min=bpm / 1.25, tempo_max=bpm * 1.25)
    peaks = np.flatnonzero(librosa.util.localmax(pulse))
    times = librosa.frames_to_time(peaks, sr=RATE, hop_length=256)
    tempo = 60.0 / float(np.median(np.diff(times))) if len(times) > 2 else None
    return tempo, times, None


TRACKERS = {"grid fit (ours)": grid, "librosa beat_track": beat_track, "librosa plp": plp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "beats")
    parser.add_argument("--quick", action="store_true", help="two tempi, one meter (the test suite)")
    args = parser.parse_args()
    from rhythm import signal

    from bench.run import describe, machine

    tempi = [90, 150] if args.quick else [60, 90, 120, 150, 180]
    meters = [4] if args.quick else [3, 4]
    kinds = ["click", "drums", "swing", "music"]
    for fn in TRACKERS.values():  # warm up numba before timing
        fn(signal("drums", 120, seconds=4), 120, 4)
    results: tp.Dict[str, tp.Dict[str, tp.Any]] = {}
    for name, fn in TRACKERS.items():
        errors, scores, downbeats, seconds = [], [], [], []
        per_kind: tp.Dict[str, tp.List[float]] = {k: [] for k in kinds}
        for kind in kinds:
            for beats_per_bar in meters:
                for bpm in tempi:
                    wav = signal(kind, bpm, beats_per_bar, seconds=12, offset=OFFSET)
                    start = time.perf_counter()
                    tempo, times, first_downbeat = fn(wav, bpm * 1.04, beats_per_bar)
                    seconds.append(time.perf_counter() - start)
                    period = 60.0 / bpm
                    truth = OFFSET + period * np.arange(-1, int(12 / period) + 1)
                    truth = truth[(truth >= 0) & (truth < 12)]
                    errors.append(abs(tempo / bpm - 1) * 100 if tempo else 100.0)
                    score = f_measure(times, truth)
                    scores.append(score)
                    per_kind[kind].append(score)
                    if first_downbeat is not None:
                        bar = period * beats_per_bar
                        downbeats.append(abs(((first_downbeat - OFFSET + bar / 2) % bar) - bar / 2) < 0.03)
        noise = [fn(signal("noise", 120, seed=s), 120, 4)[0] is not None for s in range(5)]
        results[name] = {
            "median_tempo_error_pct": statistics.median(errors),
            "worst_tempo_error_pct": max(errors),
            "beat_f_measure": statistics.mean(scores),
            "beat_f_measure_by_kind": {k: statistics.mean(v) for k, v in per_kind.items()},
            "downbeats_right": (sum(downbeats) / len(downbeats)) if downbeats else None,
            "noise_given_a_tempo": sum(noise) / len(noise),
            "ms_per_track": 1000 * statistics.median(seconds),
        }
        print(name, json.dumps(results[name]), flush=True)
    text = [
        "# Beat trackers on synthetic rhythm (bench/beats.py)",
        "",
        f"{describe(machine())}. Tracks: {', '.join(kinds)} at {', '.join(map(str, tempi))} BPM in "
        f"{' and '.join(f'{m}/4' for m in meters)}, 12 s, each asked 4% off its tempo; and noise (5 seeds).",
        "",
        "| tracker | median tempo error | worst | beat F (70 ms) | click / drums / swing / music | "
        "first downbeat right | noise given a tempo | ms per 12 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        kinds_text = " / ".join(f"{v:.2f}" for v in r["beat_f_measure_by_kind"].values())
        downbeat = "no bars" if r["downbeats_right"] is None else f"{100 * r['downbeats_right']:.0f}%"
        text.append(
            f"| {name} | {r['median_tempo_error_pct']:.2f}% | {r['worst_tempo_error_pct']:.1f}% | "
            f"{r['beat_f_measure']:.2f} | {kinds_text} | {downbeat} | {100 * r['noise_given_a_tempo']:.0f}% | "
            f"{r['ms_per_track']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    Path(f"{args.out}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
