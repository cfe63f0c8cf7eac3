"""Where a decoding step's time goes, on musicgen-small at real size (random weights), per format:
the baseline table for making the CPU decode in real time (issue #31).

    python bench/step_profile.py                     # exact, int8dyn (auto's lone choice), int8, bf16
    python bench/step_profile.py --formats int8dyn --steps 100

For each format, a lone request's step (2 rows: the prompt's and guidance's null twin, then the
sampling of its 4 codebooks) at the middle of an 8 s request (200 positions in the cache): timed
whole (the median of ``--steps``), then the same steps under torch's profiler, each op's own time
summed by kind (matrix products, attention, sampling, norms, copies, casts, element-wise...) and
what the ops leave of the profiled step: the loop's Python and torch's dispatch. Parts are timed in
real steps, where the weights stream from memory; timed alone, a product is cache-hot and several
times faster than it is in a step.

Beside them, the machine's floor: the bytes of weights a step reads over the read bandwidth measured
here (a float32 sum over 1 GB), and the step that real time needs (50 steps per second of audio, with
EnCodec's share measured). Writes ``bench/results/step-profile.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = 200  # positions filled: the middle of an 8 s request (400 steps)


def median_ms(fn: tp.Callable[[], tp.Any], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def read_bandwidth_gbs() -> float:
    """GB/s of a float32 sum over 1 GB (what streaming weights costs at best; an int8 sum is no
    measure: torch widens it element by element, 0.3 GB/s here)."""
    big = torch.ones(1 << 28, dtype=torch.float32)
    ms = median_ms(lambda: big.sum(), 5)
    return (1 << 30) / (ms / 1000) / 1e9


# torch ops by what they are, for the table (an op's self time: its own, its children's apart)
KINDS = (
    ("matrix products", ("linear_dynamic", "_weight_int8pack_mm", "addmm", "aten::mm", "aten::bmm", "linear")),
    ("attention (self and cross)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("sampling (softmax, top-k, draw)", ("softmax", "topk", "multinomial", "sort", "cumsum", "argmax", "gather")),
    ("layer norms", ("layer_norm",)),
    ("cache writes and copies", ("copy_", "index_copy", "slice", "select", "view", "as_strided", "permute")),
    ("casts", ("aten::to", "_to_copy")),
    ("element-wise (adds, scales, activation)", ("add", "mul", "gelu", "relu", "where", "div", "sub", "neg")),
    ("embeddings", ("embedding",)),
)


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other torch ops"


def profile(model: tp.Any, fmt: str, steps: int, cached: int = CACHE) -> tp.Dict[str, tp.Any]:
    """A lone request's steps, whole (wall) and under torch's profiler: each op's own time inside real
    steps (the weights streamed from memory as they are in use, not cache-hot), by kind; what the ops
    leave of the profiled step is the loop's Python and torch's dispatch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from musicgen_service.decoding import Decoder
    from musicgen_service.decoding.loop import condition_tensors, sample
    from musicgen_service.decoding.sampling import guide

    lm = model.lm
    decoder = Decoder(lm, fmt)
    runner = decoder.runner
    attributes, _ = model._prepare_tokens_and_attributes(["funk drums and slap bass"], None)
    tensors = condition_tensors(lm, attributes)
    window = runner.start(tensors, 2, cached + 2 * steps + 8)
    K = lm.num_codebooks
    token = torch.zeros((2, K, 1), dtype=torch.long)

    def one_step() -> None:
        logits = window.step(token)
        sample(guide(logits, 1, 3.0), True, 1.0, 250, 0.0)

    with torch.inference_mode():
        window.prefill(torch.zeros((2, K, cached), dtype=torch.long))
        for _ in range(3):
            one_step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - start)
        step_ms = 1000 * statistics.median(times)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                one_step()
            profiled_ms = 1000 * (time.perf_counter() - start) / steps
    by_kind: tp.Dict[str, float] = {}
    ops = 0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000 / steps
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + ms
        ops += event.count
    parts = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    parts["the loop's Python and torch's dispatch"] = max(0.0, profiled_ms - sum(by_kind.values()))
    return {
        "format": decoder.describe(),
        "step_ms": step_ms,
        "profiled_step_ms": profiled_ms,
        "ops_per_step": ops / steps,
        "parts_ms": parts,
        "weight_bytes_per_step": runner.step_bytes(),
    }


def encodec_ms_per_second(model: tp.Any) -> float:
    from musicgen_service.audio import codec

    tokens = torch.randint(0, 2048, (1, model.lm.num_codebooks, 400))
    with torch.inference_mode():
        ms = median_ms(lambda: codec.decode(model.compression_model, tokens), 3)
    return ms / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="exact,int8dyn,int8,bf16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--late", type=int, default=1400, help="a second point: the step this far in (30 s: 1,500 steps); 0: none"
    )
    parser.add_argument("--dry", action="store_true", help="the xsmall scale (the test suite)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step-profile")
    args = parser.parse_args()

    from bench import models
    from bench.run import describe, machine
    from musicgen_service.weights import hub as weights
    from musicgen_service.weights.loading import load_musicgen

    cache = (args.work / ("xsmall" if args.dry else "full")).resolve()
    weights.use_hub_cache(cache)
    scale = "xsmall" if args.dry else "small"
    models.ensure_set(cache, scale, False, mbd=False, real_t5=not args.dry)
    model = load_musicgen(cache, models.model_id(scale, False), "cpu")
    bandwidth = read_bandwidth_gbs()
    encodec = encodec_ms_per_second(model)
    real_time_step = (1000 - encodec) / 50  # ms a step may take for 1 s of audio per second
    rows = []
    for fmt in args.formats.split(","):
        row = profile(model, fmt, args.steps)
        row["floor_ms"] = row["weight_bytes_per_step"] / (bandwidth * 1e9) * 1000
        row["real_time_factor"] = (50 * row["step_ms"] + encodec) / 1000
        if args.late:  # the same step late in a 30 s request: the caches are 7x longer
            late = profile(model, fmt, max(5, args.steps // 3), args.late)
            row["late"] = {"cached": args.late, "step_ms": late["step_ms"], "parts_ms": late["parts_ms"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "machine": machine(),
        "model": "facebook/musicgen-small (random weights)" if not args.dry else "xsmall",
        "read_bandwidth_GBs": bandwidth,
        "encodec_ms_per_audio_second": encodec,
        "real_time_step_ms": real_time_step,
        "cache_positions": CACHE,
        "rows": rows,
    }
    text = [
        f"# Where a decoding step's time goes ({result['model']}, a lone request: 2 rows)",
        "",
        f"{describe(result['machine'])}; read bandwidth {bandwidth:.1f} GB/s (a float32 sum over 1 GB); EnCodec "
        f"{encodec:.0f} ms per second of audio, so real time needs a step of at most {real_time_step:.1f} ms. "
        f"The step at {CACHE} cached positions (the middle of 8 s), medians.",
        "",
    ]
    for row in rows:
        text += [
            f"## {row['format']}: {row['step_ms']:.1f} ms a step, real-time factor {row['real_time_factor']:.2f}",
            "",
            f"Weights read per step {row['weight_bytes_per_step'] / 1e6:.0f} MB: the floor at this bandwidth is "
            f"{row['floor_ms']:.1f} ms.",
            "",
            f"Under the profiler a step takes {row['profiled_step_ms']:.1f} ms ({row['ops_per_step']:.0f} torch "
            "ops); its parts, each op's own time:",
            "",
            "| part | ms | share |",
            "|---|---|---|",
        ]
        for name, ms in row["parts_ms"].items():
            text.append(f"| {name} | {ms:.2f} | {100 * ms / row['profiled_step_ms']:.0f}% |")
        if "late" in row:
            late = row["late"]
            attention = late["parts_ms"].get("attention (self and cross)", 0.0)
            text += [
                "",
                f"At {late['cached']} cached positions (late in a 30 s request): {late['step_ms']:.1f} ms a step, "
                f"real-time factor {(50 * late['step_ms'] + encodec) / 1000:.2f}; attention {attention:.2f} ms of it.",
            ]
        text.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    Path(f"{args.out}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
