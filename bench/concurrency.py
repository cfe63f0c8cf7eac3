"""Concurrent requests sharing decoding steps: throughput and latency at 1, 2, 4 and 8 at once.

    PYTHONPATH=. python bench/concurrency.py                       # musicgen-small, CPU (~15 min, 2 cores)
    PYTHONPATH=. python bench/concurrency.py --quick               # xsmall LM, tiny parts (seconds)

For each concurrency N, in one process on one service (``Service.run``, the path a
prediction takes, requests in threads as Cog's async predictions run them):

- ``sequential``: N requests of ``--seconds`` of audio each, one after another;
- ``concurrent``: the same N requests submitted at once.

Reported: requests per minute, each request's latency, and the ratios the issue
asks for: throughput concurrent / sequential, and each request's latency against
the solo latency (one request alone). Also: whether every request's output was
the same file in both runs (same seed, so it must be). The service is set up with
``concurrency`` = N (Cog's ``concurrency.max``: rows padded to 2N per step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import models  # noqa: E402

PROMPTS = [
    "lo-fi hip hop beat",
    "jazz trio with brushed drums",
    "80s synthwave",
    "ambient drone",
    "funky disco groove",
    "epic orchestral",
    "reggae skank",
    "techno, four on the floor",
]


def log(message: str) -> None:
    print(f"[concurrency] {message}", file=sys.stderr, flush=True)


def run_one(service: tp.Any, i: int, seconds: int) -> tp.Tuple[float, str]:
    start = time.perf_counter()
    path = service.predict(prompt=PROMPTS[i % len(PROMPTS)], duration=seconds, seed=100 + i)
    elapsed = time.perf_counter() - start
    return elapsed, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def concurrent(service: tp.Any, n: int, seconds: int) -> tp.Tuple[float, tp.List[float], tp.List[str]]:
    results: tp.List[tp.Any] = [None] * n

    def worker(i: int) -> None:
        results[i] = run_one(service, i, seconds)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "concurrency")
    args = parser.parse_args(argv)

    import torch

    from bench.run import machine
    from musicgen_service.weights import hub as weights

    scale = "xsmall" if args.quick else "small"
    cache = (args.work / ("quick" if args.quick else "full")).resolve()
    weights.use_hub_cache(cache)
    from musicgen_service.serving import compute

    # torch only in the service's compute thread, which serves the requests (why: musicgen_service/serving/compute.py)
    model_id = compute.shared().call(
        models.ensure_set,
        cache,
        scale,
        melody=False,
        mbd=False,
        real_t5=not args.quick,
        log=log,
        real_codec=not args.quick,
    )
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.service import Service

    report: tp.Dict[str, tp.Any] = {
        "machine": machine(),
        "model": model_id,
        "seconds_of_audio": args.seconds,
        "rows": [],
    }
    for n in [int(x) for x in args.levels.split(",")]:
        service = Service(
            Settings(weights_dir=cache, model=model_id, device="cpu", mbd="off", decoder=args.decoder, concurrency=n)
        )
        run_one(service, 99, 1)  # warm-up
        solo, _ = run_one(service, 0, args.seconds)
        seq_start = time.perf_counter()
        seq = [run_one(service, i, args.seconds) for i in range(n)]
        seq_total = time.perf_counter() - seq_start
        total, latencies, hashes = concurrent(service, n, args.seconds)
        row = {
            "concurrency": n,
            "decoder": service.generator.decoder.describe(),
            "scheduler": service.scheduler.describe(),
            "solo_latency_s": round(solo, 2),
            "sequential_total_s": round(seq_total, 2),
            "concurrent_total_s": round(total, 2),
            "sequential_req_per_min": round(60 * n / seq_total, 2),
            "concurrent_req_per_min": round(60 * n / total, 2),
            "throughput_vs_sequential": round(seq_total / total, 2),
            "latencies_s": [round(x, 2) for x in latencies],
            "max_latency_vs_solo": round(max(latencies) / solo, 2),
            "median_latency_vs_solo": round(statistics.median(latencies) / solo, 2),
            "same_outputs_as_sequential": [h == s[1] for h, s in zip(hashes, seq)],
            "rows_per_step": dict(sorted(service.scheduler.batch_sizes.items())),
        }
        report["rows"].append(row)
        log(json.dumps(row))
        del service
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        f"# Concurrent requests ({model_id}, {args.seconds} s of audio each)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m.get('cpu_flags', []))}, torch "
        f"{m['torch']} ({m['torch_threads']} threads).",
        "",
        "| at once | decoder | solo s | sequential req/min | concurrent req/min | throughput x | "
        "latency vs solo (median / max) | same outputs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['concurrency']} | {r['decoder']} | {r['solo_latency_s']} | {r['sequential_req_per_min']} | "
            f"{r['concurrent_req_per_min']} | {r['throughput_vs_sequential']}x | "
            f"{r['median_latency_vs_solo']} / {r['max_latency_vs_solo']} | "
            f"{'yes' if all(r['same_outputs_as_sequential']) else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
