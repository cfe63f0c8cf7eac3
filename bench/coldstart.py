"""Cold starts, each in a fresh process: our predictor's ``import predict`` + ``setup()`` against stock
audiocraft's ``import audiocraft.models`` + ``MusicGen.get_pretrained`` on the same weights folder.

One run (prints one JSON object):

    python bench/coldstart.py --weights DIR --model ID [--device cpu] [--stock] [--decoder auto]
                              [--prepared DIR [--fresh]] [--profile] [--mbd eager]

``--prepared DIR`` is the prepared-decoder cache setup uses (``MUSICGEN_PREPARED``); ``--fresh``
empties it first (a first boot); otherwise whatever it holds is read (a later boot).

The comparison (prints a table, writes ``bench/results/coldstart.{md,json}``):

    python bench/coldstart.py --weights DIR --model ID --compare 5

runs stock, ours on a first boot (empty cache: ``auto`` measures, converts, stores) and ours on a
later boot (the cache written by the first), in turn, ``--compare`` times each, in fresh processes
(pairing in turn keeps the ratios meaningful when the machine's speed drifts), and reports medians
with their spread. Times are wall clock from the process' first statement to the end of setup:
``total_s``; ``imports_s`` is what importing took (stock: ``import torch`` + ``import audiocraft.models``;
ours: up to setup's first log line (``import predict``, our package), plus setup's logged ``imported
torch`` and ``imported audiocraft``, which defers what a prediction never uses:
musicgen_service/core/imports.py). Peak RSS is VmHWM, so it includes
the imports. ``--profile`` runs setup under cProfile and attributes its time to phases by the
cumulative time of the library functions that do them.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before any import of ours, torch's or audiocraft's

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (phase, module path suffix, function name): where each phase's time is spent
PHASE_FUNCTIONS = [
    ("checkpoint read", "torch/serialization.py", "load"),
    ("T5 load", "transformers/modeling_utils.py", "from_pretrained"),
    ("T5 load", "transformers/tokenization_utils_base.py", "from_pretrained"),
    ("demucs load", "demucs/pretrained.py", "get_model"),
    ("model build", "audiocraft/models/builders.py", "get_lm_model"),
    ("model build", "audiocraft/models/builders.py", "get_compression_model"),
    ("state copy", "torch/nn/modules/module.py", "load_state_dict"),
    ("device transfer", "torch/nn/modules/module.py", "to"),
]


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MB. (ru_maxrss would
    carry over the parent's peak across fork + exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phases_from(stats: object) -> dict:
    totals: dict = {}
    for (filename, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        for phase, suffix, function in PHASE_FUNCTIONS:
            if name == function and filename.endswith(suffix):
                totals[phase] = totals.get(phase, 0.0) + row[3]  # cumulative time
    # T5 and demucs load inside the LM builder: report the builder's own share
    if "model build" in totals:
        totals["model build"] -= totals.get("T5 load", 0.0) + totals.get("demucs load", 0.0)
    return {k: round(v, 3) for k, v in totals.items()}


class _Lines:
    """Setup's log lines (our logger writes them to stdout), with when each arrived."""

    def __init__(self) -> None:
        self.lines: list = []

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self.lines.append((time.perf_counter() - START, line))

    def flush(self) -> None:
        pass


def one_run(args: argparse.Namespace) -> dict:
    """One setup in this process."""
    os.environ.update(
        {
            "MUSICGEN_WEIGHTS": str(args.weights),
            "MUSICGEN_MODEL": args.model,
            "MUSICGEN_DEVICE": args.device,
            "MUSICGEN_MBD": args.mbd,
            "MUSICGEN_DECODER": args.decoder,
        }
    )
    if args.prepared:
        if args.fresh:
            shutil.rmtree(args.prepared, ignore_errors=True)
        os.environ["MUSICGEN_PREPARED"] = str(args.prepared)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    result: dict = {"stock": args.stock, "mbd": args.mbd}
    if args.stock:
        from musicgen_service.weights import hub as weights

        weights.use_hub_cache(args.weights)
        start = time.perf_counter()
        import audiocraft.models
        import torch

        result["imports_s"] = round(time.perf_counter() - START, 3)
        folder = weights.musicgen_folder(args.weights, args.model)
        audiocraft.models.MusicGen.get_pretrained(str(folder), device=args.device)
        result["setup_s"] = round(time.perf_counter() - start, 3)
    else:
        lines = _Lines()
        real_stdout, sys.stdout = sys.stdout, lines
        try:
            import predict

            start = time.perf_counter()
            predictor = predict.Predictor()
            predictor.setup()
        finally:
            sys.stdout = real_stdout
        result["setup_s"] = round(time.perf_counter() - start, 3)
        first = lines.lines[0][0] if lines.lines else 0.0
        # setup's parts as it logs them ("imported audiocraft: 4.36 s", "warm-up generation: 1.2 s", ...)
        logged = {
            m.group(1): float(m.group(2))
            for _, line in lines.lines
            for m in [re.match(r"([a-zA-Z][^:]{2,60}): ([0-9.]+) s\b", line)]
            if m
        }
        result["logged_s"] = logged
        result["imports_s"] = round(
            first + logged.get("imported torch", 0.0) + logged.get("imported audiocraft", 0.0), 3
        )
        result["decoder"] = predictor.service.generator.decoder.describe()
        result["prepared_hit"] = predictor.service.generator.decoder.prepared is not None
        if args.predict:
            result.update(first_predictions(predictor, args.predict, args.device))
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    result["total_s"] = round(time.perf_counter() - START, 3)
    result["peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    result["final_rss_mb"] = round(status_mb("VmRSS"), 1)
    if profiler is not None:
        import pstats

        profiler.disable()
        result["phases_s"] = phases_from(pstats.Stats(profiler))
    return result


def first_predictions(predictor: object, seconds: int, device: str) -> dict:
    """The first and the second text prediction after setup, ``seconds`` long each, as a user's
    first requests (the first may pay what setup did not: first kernel uses, graph recording)."""
    import asyncio

    inputs = dict(
        prompt="lo-fi beat",
        input_audio=None,
        duration=seconds,
        continuation=False,
        continuation_start=0,
        continuation_end=None,
        multi_band_diffusion=False,
        normalization_strategy="loudness",
        top_k=250,
        top_p=0.0,
        temperature=1.0,
        classifier_free_guidance=3,
        output_format="wav",
        seed=1,
    )
    out = {}
    for name in ("first_request_s", "second_request_s"):
        real_stdout, sys.stdout = sys.stdout, _Lines()
        try:
            start = time.perf_counter()
            asyncio.run(predictor.predict(**inputs))  # type: ignore[attr-defined]
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            out[name] = round(time.perf_counter() - start, 3)
        finally:
            sys.stdout = real_stdout
    out["request_audio_s"] = seconds
    return out


def machine() -> dict:
    import platform

    import torch

    from musicgen_service.core.machine import cpu_flags

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    flags = sorted(
        f
        for f in cpu_flags()
        if f in {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "f16c"}
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_flags": flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def compare(args: argparse.Namespace) -> dict:
    prepared = args.prepared or ROOT / "bench" / "work" / "coldstart-prepared"
    base = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--weights",
        str(args.weights),
        "--model",
        args.model,
        "--device",
        args.device,
        "--decoder",
        args.decoder,
    ]
    kinds = {
        "stock": ["--stock"],
        "first boot": ["--prepared", str(prepared), "--fresh"],
        "later boot": ["--prepared", str(prepared)],
    }
    runs: dict = {k: [] for k in kinds}
    for i in range(args.compare):
        for kind, flags in kinds.items():  # in turn: a drift of the machine's speed hits all three
            out = subprocess.run(base + flags, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {i + 1}/{args.compare} {kind}: {runs[kind][-1]['total_s']} s", file=sys.stderr)

    def summary(rs: list) -> dict:
        row = {}
        for field in ("total_s", "imports_s", "peak_rss_mb", "final_rss_mb"):
            values = [r[field] for r in rs]
            row[field] = {"median": round(statistics.median(values), 2), "min": min(values), "max": max(values)}
        row["decoder"] = rs[-1].get("decoder")
        return row

    report = {
        "machine": machine(),
        "model": args.model,
        "decoder": args.decoder,
        "runs": args.compare,
        "summary": {k: summary(v) for k, v in runs.items()},
        "raw": runs,
    }
    stock = report["summary"]["stock"]["total_s"]["median"]
    for kind in ("first boot", "later boot"):
        report["summary"][kind]["vs_stock"] = round(report["summary"][kind]["total_s"]["median"] / stock, 2)
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Cold start: {report['model']}, decoder {report['decoder']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['cpu_flags'])}, torch {m['torch']}, "
        f"Python {m['python']}. Each row: {report['runs']} fresh processes, run in turn with the others; "
        "median (min-max). Total = imports + setup, from the process' first statement.",
        "",
        "| setup | total s | imports s | vs stock | peak RSS MB | final RSS MB | decoder |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, row in report["summary"].items():

        def cell(field: str) -> str:
            v = row[field]
            return f"{v['median']} ({v['min']}-{v['max']})"

        label = {
            "stock": "stock audiocraft (import + get_pretrained)",
            "first boot": "ours, first boot (measure, convert, store)",
            "later boot": "ours, later boot (prepared cache hit)",
        }[kind]
        lines.append(
            f"| {label} | {cell('total_s')} | {cell('imports_s')} | {row.get('vs_stock', 1.0)}x | "
            f"{cell('peak_rss_mb')} | {cell('final_rss_mb')} | {row['decoder'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stock", action="store_true", help="audiocraft's MusicGen.get_pretrained")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--decoder", default="auto", help="our setup's decoder (stock: model loading only)")
    parser.add_argument(
        "--mbd",
        default="off",
        choices=["lazy", "eager", "off"],
        help="eager: our setup also loads MultiBand Diffusion (its cost on every boot)",
    )
    parser.add_argument("--prepared", type=Path, help="the prepared-decoder cache (MUSICGEN_PREPARED)")
    parser.add_argument("--fresh", action="store_true", help="empty --prepared first: a first boot")
    parser.add_argument(
        "--predict",
        type=int,
        default=0,
        metavar="SECONDS",
        help="ours: then time the first and second text prediction of that length",
    )
    parser.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="N",
        help="stock, first boot and later boot, N fresh processes each, in turn",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "coldstart"), help="--compare: where the .md and .json go"
    )
    args = parser.parse_args()
    if args.compare:
        report = compare(args)
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return
    print(json.dumps(one_run(args)))


if __name__ == "__main__":
    main()
