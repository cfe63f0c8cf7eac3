"""Streaming: time to first audio and time to the final file, against the main model's time for the
same request, in one process on one service (real-size random weights).

    python bench/stream.py                        # CPU: musicgen-small, 8 s and 30 s, auto decoder
    python bench/stream.py --device cuda --model facebook/musicgen-stereo-melody-large
    python bench/stream.py --dry                  # the tiny set: the flow, in seconds (the test suite)

For each duration, ``--runs`` rounds of (main model, then the streaming model) with the same seed, in
turn: the main model's seconds (``Service.run``), its real-time factor (seconds per second of audio),
the streaming model's time to its first chunk and to its final file, the target for the first chunk
(``FIRST_CHUNK_SECONDS`` x the real-time factor + 0.5 s, issue #22) and the final file's time against the
main model's. Medians. Writes ``bench/results/stream.{md,json}`` (``--out``).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="facebook/musicgen-small")
    parser.add_argument("--durations", default="8,30")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--dry", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--cache", type=Path, default=None, help="the model sets' hub cache (default: WORK/full)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stream")
    args = parser.parse_args()

    from bench import models
    from bench.run import machine
    from musicgen_service.serving import streaming
    from musicgen_service.tools import tiny
    from musicgen_service.weights import hub as weights

    if args.dry:
        cache = Path(tempfile.mkdtemp(prefix="musicgen-stream-bench-"))
        weights.use_hub_cache(cache)
        tiny.write_tiny_set(cache)
        durations = [2, 3]
    else:
        cache = (args.cache or args.work / "full").resolve()
        weights.use_hub_cache(cache)
        melody = "melody" in args.model
        scale = {"facebook/musicgen-small": "small"}.get(args.model, "large")
        models.ensure_set(cache, scale, melody, mbd=False, stereo="stereo" in args.model, device=args.device)
        durations = [int(d) for d in args.durations.split(",")]
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.service import Service

    service = Service(
        Settings(weights_dir=cache, model=args.model, device=args.device, mbd="off", decoder=args.decoder)
    )
    rows = []
    for duration in durations:
        runs: tp.Dict[str, tp.List[float]] = {"main_s": [], "first_chunk_s": [], "stream_total_s": []}
        for i in range(args.runs):
            request = service.parse(prompt="lo-fi beat with warm piano", duration=duration, seed=100 + i)
            start = time.perf_counter()
            service.run(request)
            runs["main_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            first = None
            for _path in service.stream(request):
                if first is None:
                    first = time.perf_counter() - start
            runs["stream_total_s"].append(time.perf_counter() - start)
            runs["first_chunk_s"].append(first or float("nan"))
        med = {k: statistics.median(v) for k, v in runs.items()}
        rtf = med["main_s"] / duration
        rows.append(
            {
                "duration_s": duration,
                **{k: round(v, 2) for k, v in med.items()},
                "rtf": round(rtf, 3),
                "first_chunk_target_s": round(streaming.FIRST_CHUNK_SECONDS * rtf + 0.5, 2),
                "stream_vs_main": round(med["stream_total_s"] / med["main_s"], 3),
                "runs": runs,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {
        "machine": machine(),
        "device": args.device,
        "model": args.model,
        "decoder": service.generator.decoder.describe(),
        "first_chunk_s": streaming.FIRST_CHUNK_SECONDS,
        "chunk_s": streaming.CHUNK_SECONDS,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def markdown(report: tp.Dict[str, tp.Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Streaming: {report['model']}",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; device `{report['device']}`; decoder "
        f"{report['decoder']}. Chunks: the first {report['first_chunk_s']} s, then {report['chunk_s']} s. "
        "Medians of runs in turn (main, then stream, same seed).",
        "",
        "| duration s | main model s | real-time factor | first chunk s | target s | stream, final file s | vs main |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['duration_s']} | {r['main_s']} | {r['rtf']} | {r['first_chunk_s']} | "
            f"{r['first_chunk_target_s']} | {r['stream_total_s']} | {r['stream_vs_main']}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
