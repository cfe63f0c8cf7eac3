"""Fine-tuning cost at real model size (random weights: speed and memory do not depend on their values).

    python bench/train.py                       # CPU: musicgen-small, 30 s segments, lora and full at batch 1 and 2
    python bench/train.py --device cuda --scales small,large   # a GPU: also the default model (stereo melody)
    python bench/train.py --dry                 # the same flow on the tiny set in seconds (the test suite)

Measured, per model:

- **tokenizing**: seconds per minute of audio (EnCodec codes, T5 states, and for melody models the
  chroma with its demucs stem separation), over ``--segments`` segments of 30 s;
- **training**: for each method (``lora``, ``full``) and batch size (``--batches``), a fresh process
  runs ``--steps`` updates on those segments: seconds per update (the median of the updates after the
  first, which pays one-off costs), tokens per second, and peak memory (the process' VmHWM on CPUs,
  ``torch.cuda.max_memory_allocated`` on GPUs), with gradient checkpointing where ``--checkpointing``;
- **allocator** (CPU): ``--thresholds 0,1048576`` runs each configuration with glibc's default
  allocator (0, stock) and with the mmap threshold training sets (``training.allocator``), side by side.

Writes ``bench/results/train.{md,json}`` (``--out``) and prints the table. On the 2-core CPU a full
update of musicgen-small at batch 2 takes minutes: the defaults are 2 updates each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def segments(n: int, seconds: float, rate: int, channels: int) -> tp.List[tp.Any]:
    """``n`` synthetic segments: a few notes each, a different melody per segment."""
    import numpy as np
    import torch

    from musicgen_service.training.dataset import Segment

    out = []
    t = np.arange(int(seconds * rate)) / rate
    for i in range(n):
        freqs = 220 * 2 ** (np.array([0, 4, 7, 12, 7, 4]) / 12 + i / 12)
        note = (t * len(freqs) / seconds).astype(int).clip(0, len(freqs) - 1)
        wav = 0.3 * np.sin(2 * np.pi * freqs[note] * t)
        out.append(Segment(f"{i}.wav", 0.0, torch.from_numpy(np.tile(wav, (channels, 1)).astype(np.float32)), "bench"))
    return out


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(args: argparse.Namespace) -> tp.Dict[str, tp.Any]:
    """One (method, batch) in this process."""
    import torch

    from musicgen_service.core.settings import Settings
    from musicgen_service.training import allocator, base_model, loop, options, tokens
    from musicgen_service.weights import hub as weights

    allocator.THRESHOLD = args.threshold  # what loop.train sets (0: glibc's default, as stock)
    weights.use_hub_cache(args.weights)
    settings = Settings(weights_dir=args.weights, model=args.model, device=args.device, prepared_off=True)
    model = base_model.load(settings, args.model, args.device)
    features = tokens.Features.load(args.features)
    o = options.parse(
        base_model=args.model,
        default_model=args.model,
        method=args.method,
        epochs=0,
        max_steps=args.steps,
        batch_size=args.batch,
        seed=1,
        gradient_checkpointing=args.checkpointing,
    )
    params, _ = base_model.trainable(model, o, o.seed)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times: tp.List[float] = []
    start = time.perf_counter()
    original = torch.optim.AdamW.step

    def timed_step(self: tp.Any, *a: tp.Any, **k: tp.Any) -> tp.Any:  # the end of each update
        out = original(self, *a, **k)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = timed_step  # type: ignore[method-assign]
    history = loop.train(model.lm, features, o, params)
    per_step = [b - a for a, b in zip([start] + times[:-1], times)]
    steady = per_step[1:] or per_step
    tokens_per_step = args.batch * features.examples[0].codes.numel()
    s = statistics.median(steady)
    return {
        "method": args.method,
        "batch": args.batch,
        "threshold": args.threshold if args.device == "cpu" else None,
        "checkpointing": args.checkpointing,
        "steps": len(per_step),
        "s_per_step": round(s, 2),
        "first_step_s": round(per_step[0], 2),
        "tokens_per_s": round(tokens_per_step / s, 1),
        "peak_memory_MB": round(peak_memory_mb(args.device), 0),
        "final_loss": round(history.losses[-1], 4),
        "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scales",
        default="small",
        help="comma-separated: small (musicgen-small), large (the default stereo melody model)",
    )
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument(
        "--thresholds",
        default=None,
        help="CPU: comma-separated glibc mmap thresholds in bytes "
        "to compare (0: glibc's default); default: the one training sets",
    )
    parser.add_argument("--dry", action="store_true", help="the tiny set, 3 s segments: the flow, in seconds")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--cache", type=Path, default=None, help="the model sets' hub cache (default: WORK/full)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train")
    # one configuration in a fresh process (used by the run itself)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return

    from bench import models
    from bench.run import machine
    from musicgen_service.core.settings import Settings
    from musicgen_service.tools import tiny
    from musicgen_service.training import allocator, base_model, tokens
    from musicgen_service.weights import hub as weights

    thresholds = [int(t) for t in args.thresholds.split(",")] if args.thresholds else [allocator.THRESHOLD]
    if args.device != "cpu":
        thresholds = [0]  # (GPU tensors are not in glibc's heap)
    report: tp.Dict[str, tp.Any] = {"machine": machine(), "device": args.device, "models": []}
    seconds = 3.0 if args.dry else 30.0
    for scale in args.scales.split(","):
        if args.dry:
            cache = Path(tempfile.mkdtemp(prefix="musicgen-train-bench-"))
            tiny.write_tiny_set(cache)
            model_id = "facebook/musicgen-stereo-melody-large" if scale == "large" else "facebook/musicgen-small"
        else:
            cache = (args.cache or args.work / "full").resolve()
            melody, stereo = (True, True) if scale == "large" else (False, False)
            model_id = models.ensure_set(cache, scale, melody, mbd=False, stereo=stereo, device=args.device)
        weights.use_hub_cache(cache)
        settings = Settings(weights_dir=cache, model=model_id, device=args.device, prepared_off=True)
        model = base_model.load(settings, model_id, args.device)
        segs = segments(args.segments, seconds, model.sample_rate, model.audio_channels)
        start = time.perf_counter()
        features = tokens.compute(model, segs, "bench")
        tokenize_s = time.perf_counter() - start
        del model
        features_path = Path(tempfile.mkdtemp(prefix="musicgen-train-bench-")) / "features.pt"
        features.save(features_path)
        entry = {
            "model": model_id,
            "segment_s": seconds,
            "segments": args.segments,
            "tokenize_s_per_audio_minute": round(60 * tokenize_s / (seconds * args.segments), 2),
            "runs": [],
        }
        for method, batch, threshold in [
            (m, b, t) for m in args.methods.split(",") for b in map(int, args.batches.split(",")) for t in thresholds
        ]:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--one",
                "--weights",
                str(cache),
                "--model",
                model_id,
                "--features",
                str(features_path),
                "--method",
                method,
                "--batch",
                str(batch),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
                "--threshold",
                str(threshold),
            ] + (["--checkpointing"] if args.checkpointing else [])
            out = subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
            if out.returncode or line is None:
                entry["runs"].append(
                    {"method": method, "batch": batch, "threshold": threshold, "error": out.stderr[-2000:]}
                )
            else:
                entry["runs"].append(json.loads(line[7:]))
            print(f"{model_id} {method} batch {batch} threshold {threshold}: {entry['runs'][-1]}", file=sys.stderr)
        report["models"].append(entry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: tp.Dict[str, tp.Any]) -> str:
    m = report["machine"]
    lines = [
        "# Fine-tuning cost",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; device `{report['device']}`. Random weights at "
        "real size; each row a fresh process; seconds per update: the median after the first.",
        "",
    ]
    for entry in report["models"]:
        lines += [
            f"## {entry['model']}",
            "",
            f"Tokenizing: {entry['tokenize_s_per_audio_minute']} s per minute of audio "
            f"({entry['segments']} segments of {entry['segment_s']:g} s).",
            "",
            "| method | batch | allocator | trainable M | s / update | first update s | tokens/s | peak memory MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in entry["runs"]:
            t = r.get("threshold")
            alloc = "-" if t is None else "glibc default (stock)" if t == 0 else f"mmap from {t // 1024} KiB"
            if "error" in r:
                lines.append(
                    f"| {r['method']} | {r['batch']} | {alloc} | failed: {r['error'].splitlines()[-1][:80]} | | | | |"
                )
            else:
                lines.append(
                    f"| {r['method']} | {r['batch']} | {alloc} | {r['trainable_M']} | {r['s_per_step']} | "
                    f"{r['first_step_s']} | {r['tokens_per_s']} | {r['peak_memory_MB']} |"
                )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
