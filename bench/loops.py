"""The loop model: 1 against 4 variations, the variations together (rows sharing decoding steps)
against one after another (as the anchor, andreasjansson/musicgen-looper, makes them), and the
post-processing of a loop (tracking, cutting, stretching, the seam) against its generation.

    python bench/loops.py                 # CPU: musicgen-small at real size (random weights), auto decoder
    python bench/loops.py --dry           # the tiny set: the flow, in seconds (the test suite)

Random weights make noise, which has no tempo: every loop takes the no-tempo path there, and the
generation is measured with one seed per loop (``tries=1``) so that retries do not blur it. The
post-processing is measured apart on synthetic drum and music tracks at the request's tempo (5%
off, so that the stretch runs), the length a loop's generation has. Medians of ``--runs``. Writes
``bench/results/loops.{md,json}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # rhythm: the test suite's synthetic tracks


def post_processing(bpm: float, bars: int, beats_per_bar: int, runs: int) -> tp.Dict[str, float]:
    """Seconds to track, cut, stretch and seam one loop from a generation's worth of audio."""
    from rhythm import signal

    from musicgen_service.audio import beats, looping

    seconds = looping.generation_seconds(bpm, bars, beats_per_bar)
    out = {}
    for kind in ("drums", "music"):
        wav = signal(kind, bpm * 0.95, beats_per_bar, seconds=seconds, channels=1, offset=0.5)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            found = beats.track(wav, 32000, bpm, beats_per_bar)
            assert found is not None and looping.cut(wav, 32000, found, bpm, bars) is not None
            times.append(time.perf_counter() - start)
        out[kind] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="facebook/musicgen-small")
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--bpm", type=float, default=120.0)
    parser.add_argument("--bars", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dry", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--cache", type=Path, default=None, help="the model sets' hub cache (default: WORK/full)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loops")
    args = parser.parse_args()

    from bench import models
    from bench.run import describe, machine
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.loops import LoopService
    from musicgen_service.tools import tiny
    from musicgen_service.weights import hub as weights

    if args.dry:
        cache = Path(tempfile.mkdtemp(prefix="musicgen-loops-bench-"))
        weights.use_hub_cache(cache)
        tiny.write_tiny_set(cache)
        args.bars, args.runs = 1, 1
    else:
        cache = (args.cache or args.work / "full").resolve()
        weights.use_hub_cache(cache)
        scale = {"facebook/musicgen-small": "small"}.get(args.model, "large")
        models.ensure_set(
            cache, scale, "melody" in args.model, mbd=False, stereo="stereo" in args.model, device=args.device
        )
    settings = Settings(weights_dir=cache, model=args.model, device=args.device, mbd="off", decoder=args.decoder)
    together = LoopService(settings, tries=1)
    apart = LoopService(settings, tries=1, together=False)
    inputs = dict(prompt="funk drums and bass", bpm=args.bpm, bars=args.bars, beats_per_bar=4)
    rows: tp.Dict[str, tp.Any] = {}
    for name, service, variations in (
        ("1 loop", together, 1),
        ("4, together", together, 4),
        ("4, one after another", apart, 4),
    ):
        times, rounds = [], []
        for i in range(args.runs):
            start = time.perf_counter()
            service.predict(**inputs, variations=variations, seed=10 + i)
            times.append(time.perf_counter() - start)
            rounds.append(service.report.generation_s)
        rows[name] = {"seconds": statistics.median(times), "generation_rounds_s": rounds[-1]}
        print(f"{name}: {rows[name]['seconds']:.1f} s (rounds {['%.1f' % r for r in rounds[-1]]})", flush=True)
    post = post_processing(args.bpm, args.bars, 4, 3)
    one = rows["1 loop"]["seconds"]
    result = {
        "machine": machine(),
        "model": args.model,
        "decoder": together.service.generator.decoder.describe(),
        "batching": together.service.scheduler.describe(),
        "request": {**inputs, "loop_seconds": args.bars * 4 * 60 / args.bpm},
        "rows": rows,
        "ratio_4_together": rows["4, together"]["seconds"] / one,
        "ratio_4_apart": rows["4, one after another"]["seconds"] / one,
        "post_processing_s": post,
        "post_share_of_one_loop": max(post.values()) / one,
    }
    text = [
        f"# The loop model ({'dry run, tiny set' if args.dry else args.model + ', real size, random weights'})",
        "",
        f"{describe(result['machine'])}; decoder {result['decoder']}; {result['batching']}.",
        f"Request: {args.bars} bars of 4 at {args.bpm:g} BPM ({result['request']['loop_seconds']:.1f} s a loop), "
        f"median of {args.runs}.",
        "",
        "| request | seconds | x one loop | generation rounds (s) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        rounds_text = ", ".join(f"{r:.1f}" for r in row["generation_rounds_s"])
        text.append(f"| {name} | {row['seconds']:.1f} | {row['seconds'] / one:.2f} | {rounds_text} |")
    text += [
        "",
        "Post-processing of one loop (tracking + cutting + stretching + seam), on synthetic tracks played 5% "
        "off the asked tempo: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in post.items())
        + f" = {100 * result['post_share_of_one_loop']:.1f}% of one loop's request.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    Path(f"{args.out}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
