"""The one-call GPU check: the GPU path end to end on real-size random models, in one run.

    # on a bare H100/H200 (torch 2.11, no package index), with ../shared/tools/gpu-bundle's archive
    # copied to .gpu/site.tar.xz (see bench/README.md for the exact device call):
    python3 bench/gpu_check.py --out $OUT/gpu.json
    # the same flow on the CPU at the xsmall scale (the test suite runs it):
    python3 bench/gpu_check.py --dry --out /tmp/gpu-dry.json

It writes the real-size random model sets (on the GPU: seconds instead of minutes), then measures,
in order of importance, writing the JSON after every step so that a run cut short still reports:

1. the Predictor with the default model (facebook/musicgen-stereo-melody-large): text 8 s (twice:
   the first request of a shape records its CUDA graph; the same seed must give the same file),
   melody 8 s and 30 s, text 30 s, continuation, 60 s, mp3, MultiBand Diffusion on;
2. stock audiocraft ``generate`` vs our ``exact`` and ``fast`` decoders, default model, 8 s;
3. the same on musicgen-small, with transformers' MusicGen, and fast-vs-exact quality
   (teacher-forced KL and top-1 agreement, bench/quality.py);
4. what ``exact`` promises on CUDA: stock's agreement with itself (same seed, twice) and
   ``exact``'s with stock (musicgen-small, 2 s);
5. the streaming model on the default model (time to first audio, bench/stream.py);
6. LoRA fine-tuning of musicgen-small and of the default model, batch 4 x 30 s with gradient
   checkpointing (seconds per update, peak GPU memory: bench/train.py).

0. setup as a user sees it: a fresh process's ``import predict`` + ``setup()`` (imports, loading, the
   warm-up generation, graph recording), then its first and second 8 s request (bench/coldstart.py);

Top-level ``"headline"``: device, setup_s, first_request_8s_s, default_text_8s_s, default_melody_30s_s,
fast_speedup_vs_audiocraft_8s, cuda_graph_failures, and more. ``--budget`` seconds (default 450)
bounds the run: steps that would start after it are marked skipped.

``--dry``: CPU, the xsmall LM (with the test suite's tiny T5, htdemucs, EnCodec and MBD), fp16, durations
1/2/3 s instead of 8/30/60 s (extension windows are tested in tests/test_decoding.py); the ``fast``
decoder runs its static steps eagerly (what a GPU records as graphs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import traceback
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import models  # noqa: E402
from bench.run import PROMPT, SEED, timed  # noqa: E402


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


class Report:
    """The JSON report, written after every step; each step is timed, and its error recorded."""

    def __init__(self, path: Path, budget_s: float, device: str):
        self.path = path
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data: tp.Dict[str, tp.Any] = {"headline": {"device": device}, "steps": {}, "errors": {}}
        self.device = device

    @property
    def headline(self) -> tp.Dict[str, tp.Any]:
        return self.data["headline"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, fn: tp.Callable[[], tp.Any]) -> tp.Any:
        if self.elapsed() > self.budget_s:
            self.data["steps"][name] = "skipped: over budget"
            log(f"{name}: skipped (over the {self.budget_s:.0f} s budget)")
            self.write()
            return None
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            result = fn()
            self.data["steps"][name] = {"s": round(time.perf_counter() - start, 2), "result": result}
            log(f"{name}: {json.dumps(result)[:600]}")
            return result
        except Exception as exc:
            self.data["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            self.data["steps"][name] = {
                "s": round(time.perf_counter() - start, 2),
                "error": f"{type(exc).__name__}: {exc}",
            }
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            return None
        finally:
            self.data["total_s"] = round(self.elapsed(), 1)
            self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------- helpers


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> tp.Optional[float]:
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return None


def audio_file(folder: Path, seconds: float, name: str) -> Path:
    """A stereo test tune (a melody of sine tones) as wav."""
    import numpy as np
    import soundfile

    rate = 32000
    notes = [262, 330, 392, 523, 440, 349, 294, 247]
    n = int(rate * seconds)
    t = np.arange(n) / rate
    freq = np.array(notes)[(t * 2).astype(int) % len(notes)]
    wav = 0.4 * np.sin(2 * np.pi * np.cumsum(freq) / rate)
    path = folder / name
    soundfile.write(str(path), np.stack([wav, wav * 0.8], axis=1).astype(np.float32), rate)
    return path


def file_seconds(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


def graph_stats(decoder: tp.Any) -> tp.Optional[tp.Dict[str, tp.Any]]:
    graphs = getattr(decoder, "graphs", None)
    return None if graphs is None else graphs.stats()


# ---------------------------------------------------------------------------------------- steps

PREDICT_DEFAULTS = dict(
    prompt=PROMPT,
    input_audio=None,
    duration=8,
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
    seed=SEED,
)


def setup_as_a_user_sees_it(report: Report, device: str, short: int) -> None:
    """A fresh process, as Cog's worker starts: ``import predict`` + ``setup()`` of the default model
    (imports, loading, warm-up generation, graph recording), then its first and second text
    prediction (bench/coldstart.py --predict)."""
    import subprocess

    def run() -> tp.Dict[str, tp.Any]:
        cmd = [
            sys.executable,
            str(ROOT / "bench" / "coldstart.py"),
            "--weights",
            os.environ["MUSICGEN_WEIGHTS"],
            "--model",
            os.environ["MUSICGEN_MODEL"],
            "--device",
            device,
            "--decoder",
            os.environ["MUSICGEN_DECODER"],
            "--mbd",
            "lazy",
            "--predict",
            str(short),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    r = report.run("setup_as_a_user_sees_it", run)
    if r:
        h = report.headline
        h["setup_s"] = r["total_s"]
        h["setup_imports_s"] = r["imports_s"]
        h["setup_warm_up_s"] = r["logged_s"].get("warm-up generation")
        h["first_request_8s_s"] = r["first_request_s"]  # (named for the real run's 8 s; --dry: 1 s)
        h["second_request_8s_s"] = r["second_request_s"]
        h["first_vs_second_request"] = round(r["first_request_s"] / max(r["second_request_s"], 1e-9), 2)


def predictor_steps(report: Report, device: str, durations: tp.Dict[str, int], tmp: Path, dry: bool) -> tp.Any:
    from predict import Predictor

    state: tp.Dict[str, tp.Any] = {}

    def setup() -> tp.Dict[str, tp.Any]:
        reset_peak(device)
        predictor = Predictor()
        seconds, _ = timed(device, predictor.setup)
        if dry:  # the static loop a GPU records (fp16, MUSICGEN_DECODER below), run eagerly on the CPU
            from musicgen_service.decoding.graphs import StepGraphs

            decoder = predictor.service.generator.decoder
            decoder.graphs = StepGraphs(decoder.runner, record=False)
        state["predictor"] = predictor
        return {
            "setup_s": round(seconds, 2),
            "decoder": predictor.service.generator.decoder.describe(),
            "peak_gpu_GB": peak_gb(device),
        }

    report.run("predictor_setup", setup)
    predictor = state.get("predictor")
    if predictor is None:
        return None
    decoder = predictor.service.generator.decoder
    short, long, longer = durations["short"], durations["long"], durations["longer"]
    melody = audio_file(tmp, long + 2, "melody.wav")
    clip = audio_file(tmp, 10 if not dry else 2, "clip.wav")
    hashes: tp.Dict[str, str] = {}
    tokens: tp.Dict[str, tp.Any] = {}
    decode = predictor.service.generator.to_audio

    def keep_tokens(codes: tp.Any, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:  # the last prediction's tokens
        tokens["last"] = codes.cpu()
        return decode(codes, *args, **kwargs)

    predictor.service.generator.to_audio = keep_tokens

    def predict(name: str, expect_s: float, **inputs: tp.Any) -> tp.Callable[[], tp.Dict[str, tp.Any]]:
        def run() -> tp.Dict[str, tp.Any]:
            import hashlib

            reset_peak(device)
            before = dict(graph_stats(decoder) or {})
            seconds, path = timed(device, lambda: asyncio.run(predictor.predict(**{**PREDICT_DEFAULTS, **inputs})))
            got = file_seconds(Path(path))
            hashes[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            tokens[name] = tokens["last"]
            after = graph_stats(decoder) or {}
            out = {
                "s": round(seconds, 3),
                "audio_s": round(got, 2),
                "expected_audio_s": expect_s,
                "rtf": round(seconds / max(got, 1e-9), 3),
                "peak_gpu_GB": peak_gb(device),
                "file": Path(path).name,
            }
            if after:
                out["graphs"] = {
                    k: after[k] - before.get(k, 0) if isinstance(after[k], (int, float)) else after[k] for k in after
                }
            if abs(got - expect_s) > 0.1:
                raise AssertionError(f"{name}: {got:.2f} s of audio, expected {expect_s}")
            return out

        return run

    r = report.run(f"text_{short}s_first", predict(f"text_{short}s_first", short, duration=short))
    r2 = report.run(f"text_{short}s", predict(f"text_{short}s", short, duration=short))
    if r2:
        report.headline["default_text_8s_s"] = r2["s"]
        report.headline["default_text_8s_first_request_s"] = r["s"] if r else None
        report.headline["seed_reproducible"] = hashes.get(f"text_{short}s_first") == hashes.get(f"text_{short}s")
        first, again = tokens.get(f"text_{short}s_first"), tokens.get(f"text_{short}s")
        if first is not None and again is not None:
            report.headline["seed_reproducible_tokens"] = round((first == again).float().mean().item(), 4)
    r = report.run(f"melody_{long}s", predict(f"melody_{long}s", long, duration=long, input_audio=melody))
    if r:
        report.headline["default_melody_30s_s"] = r["s"]
    report.run(f"melody_{short}s", predict(f"melody_{short}s", short, duration=short, input_audio=melody))
    r = report.run(f"text_{long}s", predict(f"text_{long}s", long, duration=long))
    if r:
        report.headline["default_text_30s_s"] = r["s"]
    clip_s = 10 if not dry else 2
    report.run(
        "continuation", predict("continuation", clip_s + short, duration=short, input_audio=clip, continuation=True)
    )
    r = report.run(f"text_{longer}s", predict(f"text_{longer}s", longer, duration=longer))
    if r:
        report.headline[f"default_text_{longer}s_s"] = r["s"]
    report.run(f"mp3_{short}s", predict(f"mp3_{short}s", short, duration=short, output_format="mp3"))
    r = report.run(f"mbd_{short}s", predict(f"mbd_{short}s", short, duration=short, multi_band_diffusion=True))
    if r:
        report.headline["default_mbd_8s_s"] = r["s"]
    stats = graph_stats(decoder)
    report.data["predictor_graphs"] = stats
    report.write()
    return predictor


def decoder_comparison(
    report: Report,
    name: str,
    service: tp.Any,
    device: str,
    duration: int,
    modes: tp.Sequence[str],
    with_hf: bool,
    dry: bool,
    hf_scale: str,
    t5_config: tp.Any,
) -> tp.Dict[str, tp.Any]:
    """stock audiocraft vs our decoders on one model (same seed, one process), then transformers'."""
    import torch

    from bench.run import build_hf, run_hf, run_stock
    from musicgen_service.generation.generator import Generator

    model = service.model
    steps = duration * 50 + 3
    results: tp.Dict[str, tp.Any] = {"duration_s": duration, "steps": steps}

    def stock() -> tp.Dict[str, tp.Any]:
        seconds, tokens = run_stock(model, duration, None, device)
        results["_stock_tokens"] = tokens
        return {"s": round(seconds, 2), "ms_per_step": round(1000 * seconds / steps, 2)}

    r = report.run(f"{name}_stock_{duration}s", stock)
    stock_s = r["s"] if r else None
    for mode in modes:

        def ours(mode: str = mode) -> tp.Dict[str, tp.Any]:
            generator = Generator(model, mode)
            if dry and mode == "fast":
                from musicgen_service.decoding import Decoder

                generator.decoder = Decoder(model.lm, "fp16", static_steps=True)
            request = service.parse(prompt=PROMPT, duration=duration, seed=SEED)
            if mode == "fast":  # the first request of a shape records its graphs: timed separately
                first, _ = timed(device, lambda: generator.generate(request).tokens)
            seconds, tokens = timed(device, lambda: generator.generate(request).tokens)
            out: tp.Dict[str, tp.Any] = {
                "decoder": generator.decoder.describe(),
                "s": round(seconds, 3),
                "ms_per_step": round(1000 * seconds / steps, 2),
            }
            if mode == "fast":
                out["first_request_s"] = round(first, 3)
                out["graphs"] = graph_stats(generator.decoder)
            if stock_s:
                out["speedup_vs_audiocraft"] = round(stock_s / seconds, 2)
            if "_stock_tokens" in results:
                out["token_agreement_with_stock"] = round(
                    (tokens.cpu() == results["_stock_tokens"].cpu()).float().mean().item(), 4
                )
            results[f"_{mode}_tokens"] = tokens
            results[mode] = out
            generator = None  # (freed before the next one is built)
            gc.collect()
            return out

        report.run(f"{name}_{mode}_{duration}s", ours)
    if with_hf:

        def hf() -> tp.Dict[str, tp.Any]:
            model_hf = build_hf(
                hf_scale, device, torch.float16 if device.startswith("cuda") else torch.float32, t5_config
            )
            run_hf(model_hf, 1, device)  # warm-up
            seconds = run_hf(model_hf, duration, device)
            del model_hf
            gc.collect()
            out = {"s": round(seconds, 2), "ms_per_step": round(1000 * seconds / steps, 2)}
            if "fast" in results:
                out["fast_speedup_vs_transformers"] = round(seconds / results["fast"]["s"], 2)
            return out

        results["transformers"] = report.run(f"{name}_transformers_{duration}s", hf)
    return results


def quality(report: Report, service: tp.Any, reference: tp.Any, device: str) -> None:
    def run() -> tp.Dict[str, tp.Any]:

        from bench.quality import teacher_forced
        from musicgen_service.decoding.runner import Runner

        model = service.model
        with model.autocast:  # exact runs under stock's autocast; fp16 turns it off inside
            q = teacher_forced(model, Runner(model.lm), Runner(model.lm, "fp16"), PROMPT, reference)
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in q.items()}

    r = report.run("small_fast_vs_exact_quality", run)
    if r:
        report.headline["fast_vs_exact_kl_mean"] = r["kl_mean"]
        report.headline["fast_vs_exact_top1"] = r["top1_agreement"]


def exact_promise(report: Report, service: tp.Any, device: str, duration: int) -> None:
    """Stock against itself and exact against stock, same seed: what 'exact' can promise here."""

    def run() -> tp.Dict[str, tp.Any]:
        from bench.run import run_stock
        from musicgen_service.generation.generator import Generator

        model = service.model
        _, a = run_stock(model, duration, None, device)
        _, b = run_stock(model, duration, None, device)
        request = service.parse(prompt=PROMPT, duration=duration, seed=SEED)
        exact = Generator(model, "exact").generate(request).tokens
        agree = lambda x, y: round((x.cpu() == y.cpu()).float().mean().item(), 4)
        first_diff = (exact.cpu() != a.cpu()).nonzero()
        return {
            "stock_vs_stock": agree(a, b),
            "exact_vs_stock": agree(exact, a),
            "first_difference_frame": int(first_diff[0, -1]) if len(first_diff) else None,
        }

    r = report.run(f"exact_promise_{duration}s", run)
    if r:
        report.headline["stock_self_agreement"] = r["stock_vs_stock"]
        report.headline["exact_vs_stock_agreement"] = r["exact_vs_stock"]


# ---------------------------------------------------------------------------------------- main


def streaming_and_training(report: Report, device: str, dry: bool, cache: Path, default_model: str) -> None:
    """5. the streaming model's time to first audio (bench/stream.py) on the default model, and the loop
    model's 1 against 4 variations (bench/loops.py); 6. LoRA
    training of musicgen-small and of the default model at batch 4 x 30 s with gradient checkpointing
    (bench/train.py): seconds per update and peak GPU memory. Fresh processes, their JSON kept."""
    import subprocess

    def bench(script: str, flags: tp.List[str], out: str) -> tp.Callable[[], tp.Dict[str, tp.Any]]:
        def run() -> tp.Dict[str, tp.Any]:
            path = Path(tempfile.mkdtemp(prefix="musicgen-gpu-check-")) / out
            cmd = [sys.executable, str(ROOT / "bench" / script), "--device", device, "--out", str(path)] + flags
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            return json.loads(path.with_suffix(".json").read_text())

        return run

    stream_flags = (
        ["--dry"] if dry else ["--model", default_model, "--durations", "8", "--runs", "2", "--cache", str(cache)]
    )
    r = report.run("streaming_default", bench("stream.py", stream_flags, "stream"))
    if r:
        report.headline["stream_first_chunk_s"] = r["rows"][0]["first_chunk_s"]
        report.headline["stream_vs_main"] = r["rows"][0]["stream_vs_main"]
    loop_flags = ["--dry"] if dry else ["--model", default_model, "--runs", "1", "--cache", str(cache)]
    r = report.run("loops_default", bench("loops.py", loop_flags, "loops"))
    if r:  # (GPUs decode each request alone today: the variations run one after another there)
        report.headline["loops_4_vs_1"] = round(r["ratio_4_together"], 2)
        report.headline["loop_post_processing_share"] = round(r["post_share_of_one_loop"], 3)
    train_flags = (
        ["--dry", "--segments", "4", "--steps", "2", "--batches", "4", "--methods", "lora"]
        if dry
        else [
            "--scales",
            "small,large",
            "--segments",
            "4",
            "--steps",
            "3",
            "--batches",
            "4",
            "--methods",
            "lora",
            "--checkpointing",
            "--cache",
            str(cache),
        ]
    )
    r = report.run("train_lora_batch4", bench("train.py", train_flags, "train"))
    if r:
        for entry in r["models"]:
            run = next((x for x in entry["runs"] if "s_per_step" in x), None)
            key = "default" if "melody" in entry["model"] else "small"
            if run:
                report.headline[f"train_{key}_lora_b4_s_per_update"] = run["s_per_step"]
                report.headline[f"train_{key}_lora_b4_peak_GB"] = round(run["peak_memory_MB"] / 1024, 1)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, xsmall scale: the same flow, for the test suite")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--work", type=Path, default=None, help="where model sets are written (default: a temp dir)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which no new step starts")
    args = parser.parse_args(argv)

    import torch

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: use --dry on a CPU")
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="musicgen-gpu-check-")).resolve()
    cache = work / "weights"
    from musicgen_service.tools import tiny
    from musicgen_service.weights import hub as weights

    weights.use_hub_cache(cache)  # before anything imports the hub libraries
    scale = "xsmall" if args.dry else "large"
    # the default model (facebook/musicgen-stereo-melody-large; its xsmall twin in a dry run)
    os.environ.update(
        {
            "MUSICGEN_WEIGHTS": str(cache),
            "MUSICGEN_DEVICE": device,
            "MUSICGEN_MBD": "lazy",
            "MUSICGEN_DECODER": "fp16" if args.dry else "auto",  # auto is fp16 on GPUs
            "MUSICGEN_MODEL": models.model_id(scale, True, True),
        }
    )
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    report = Report(args.out, args.budget, name)
    small = "xsmall" if args.dry else "small"
    durations = {"short": 1, "long": 2, "longer": 3} if args.dry else {"short": 8, "long": 30, "longer": 60}

    def environment() -> tp.Dict[str, tp.Any]:
        from bench.run import bandwidth, machine

        return {**machine(), "bandwidth": bandwidth(device)}

    report.run("environment", environment)

    def write_models() -> tp.Dict[str, tp.Any]:
        times = {}
        for key, (sc, melody, stereo) in {"default": (scale, True, True), "small": (small, False, False)}.items():
            start = time.perf_counter()
            models.ensure_set(
                cache, sc, melody, real_t5=not args.dry, stereo=stereo, device=device, log=log, real_codec=not args.dry
            )
            times[key] = round(time.perf_counter() - start, 1)
        return {"write_s": times}

    report.run("write_models", write_models)

    def stock_service(model_id: str) -> tp.Any:
        """A service whose LM keeps its own weights (the Predictor's decoder released the ones it
        keeps in another precision), for the stock / exact / fast comparisons."""
        from musicgen_service.core.settings import Settings
        from musicgen_service.serving.service import Service

        return Service(Settings(weights_dir=cache, model=model_id, device=device, mbd="off", decoder="stock"))

    failures = 0
    setup_as_a_user_sees_it(report, device, durations["short"])
    with tempfile.TemporaryDirectory() as tmp:
        predictor = predictor_steps(report, device, durations, Path(tmp), args.dry)
        if predictor is not None:
            graphs = predictor.service.generator.decoder.graphs
            failures += graphs.failures if graphs is not None else 0
            del predictor, graphs
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
    holder: tp.Dict[str, tp.Any] = {}
    report.run(
        "default_setup",
        lambda: holder.update(default=stock_service(models.model_id(scale, True, True))) or {"ok": True},
    )
    if "default" in holder:
        service = holder.pop("default")
        res = decoder_comparison(
            report, "default", service, device, durations["short"], ["exact", "fast"], False, args.dry, scale, None
        )
        if res.get("fast", {}).get("speedup_vs_audiocraft"):
            report.headline["fast_speedup_vs_audiocraft_8s"] = res["fast"]["speedup_vs_audiocraft"]
            report.headline["default_fast_ms_per_step"] = res["fast"]["ms_per_step"]
        if res.get("exact", {}).get("speedup_vs_audiocraft"):
            report.headline["exact_speedup_vs_audiocraft_8s"] = res["exact"]["speedup_vs_audiocraft"]
        del service, res
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    report.run("small_setup", lambda: holder.update(small=stock_service(models.model_id(small, False))) or {"ok": True})
    if "small" in holder:
        service = holder["small"]
        t5_config = models.real_t5_config() if not args.dry else tiny.tiny_t5_config()
        res = decoder_comparison(
            report, "small", service, device, durations["short"], ["exact", "fast"], True, args.dry, small, t5_config
        )
        if "_exact_tokens" in res:
            quality(report, service, res["_exact_tokens"], device)
        exact_promise(report, service, device, 2)
        del service
        holder.clear()
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    streaming_and_training(report, device, args.dry, cache, models.model_id(scale, True, True))
    report.headline["cuda_graph_failures"] = failures + sum(
        step["result"]["graphs"]["failures"]
        for step in report.data["steps"].values()
        if isinstance(step, dict)
        and isinstance(step.get("result"), dict)
        and isinstance(step["result"].get("graphs"), dict)
        and "first_request_s" in step["result"]
    )
    report.headline["errors"] = len(report.data["errors"])
    report.write()
    log(f"done in {report.elapsed():.0f} s: {json.dumps(report.headline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
