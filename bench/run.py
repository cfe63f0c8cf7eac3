"""Benchmarks at real model sizes (random weights): cold start, generation speed against the stock
paths, decode times, and the memory-bandwidth floor. Writes a markdown table and JSON.

    script/bench                       # musicgen-small on this machine's CPU (~35 min on 2 cores)
    script/bench --quick               # smoke run: xsmall LM, real EnCodec, tiny T5, 1-2 s (< 2 min)
    script/bench --scales small,medium --melody-scales medium --durations 8,30
    script/bench --device cuda --dtype float16 --scales small,medium,large   # GPU (see bench/README.md)

Every comparison runs in this one process, on the same model object, one path after the other
for each duration: our predictor (``Service``: request, generation, decode), stock audiocraft
``MusicGen.generate`` and Hugging Face transformers' ``MusicgenForConditionalGeneration`` (built
from the matching config, random weights). Ratios are reported next to seconds, because the
machines are noisy. Cold starts run in fresh processes (bench/coldstart.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import models  # noqa: E402

PROMPT = "lo-fi hip hop beat with warm piano chords and vinyl crackle"
SEED = 1234


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- machine


def describe(machine: tp.Dict[str, tp.Any]) -> str:
    """The CPU a figure came from: its name, the features the kernels use, its cores."""
    flags = ", ".join(machine.get("cpu_flags", []))
    return f"{machine.get('cpu', '?')} ({flags}), {machine.get('cores', '?')} cores"


def machine() -> tp.Dict[str, tp.Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from musicgen_service.core.machine import cpu_flags

    relevant = (
        "avx2",
        "f16c",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_int8",
        "amx_tile",
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_flags": [f for f in relevant if f in cpu_flags()],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bandwidth(device: str) -> tp.Dict[str, float]:
    """Memory bandwidth as this process sees it: a read (sum) and a copy of 1 GiB, best of 5."""
    import torch

    x = torch.ones(2**28, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)

    def best(fn: tp.Callable[[], tp.Any]) -> float:
        times = []
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    read = x.numel() * 4 / best(lambda: x.sum()) / 1e9
    copy = 2 * x.numel() * 4 / best(lambda: y.copy_(x)) / 1e9  # bytes read + written
    return {"read_GBps": round(read, 1), "copy_GBps": round(copy, 1)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def streamed_bytes(lm: tp.Any) -> int:
    """Bytes of LM weights every decoding step reads: all transformer and output weights, not the
    embedding tables (4 rows each) nor the conditioners (run once per prediction)."""
    total = 0
    for name, p in lm.named_parameters():
        if name.startswith(("emb.", "condition_provider.")):
            continue
        total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------- cold start


def cold_start(
    cache: Path, model_id: str, device: str, profile: bool = True, decoders: tp.Sequence[str] = ()
) -> tp.Dict[str, tp.Any]:
    def run(*flags: str) -> tp.Dict[str, tp.Any]:
        cmd = [
            sys.executable,
            str(ROOT / "bench" / "coldstart.py"),
            "--weights",
            str(cache),
            "--model",
            model_id,
            "--device",
            device,
            *flags,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            raise RuntimeError(f"cold start {flags} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    log(f"cold start: {model_id}")
    # Stock and ours alternate, twice each when profiling too: the best of each is reported. "ours"
    # loads the models (decoder "stock": nothing more), like get_pretrained; "ours_full" is the
    # whole setup, with the default decoder's preparation (auto: measuring, converting, releasing).
    runs: tp.Dict[str, tp.List[tp.Dict[str, tp.Any]]] = {"ours": [], "stock": [], "ours_full": []}
    for _ in range(2 if profile else 1):
        runs["stock"].append(run("--stock"))
        runs["ours"].append(run("--decoder", "stock"))
        runs["ours_full"].append(run())
    ours, stock, full = (min(runs[k], key=lambda r: r["total_s"]) for k in ("ours", "stock", "ours_full"))
    phases = run("--profile", "--decoder", "stock")["phases_s"] if profile else {}
    # the whole setup with each decoder: what its weights cost in time and memory (peak / final RSS)
    per_decoder = {name: run("--decoder", name) for name in decoders}
    return {
        "ours": ours,
        "stock": stock,
        "ours_full": full,
        "phases_s": phases,
        "per_decoder": per_decoder,
        "setup_speedup_vs_stock": round(stock["total_s"] / ours["total_s"], 2),
    }


# ---------------------------------------------------------------------------------------- generation


def timed(device: str, fn: tp.Callable[[], tp.Any]) -> tp.Tuple[float, tp.Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def run_ours(
    service: tp.Any, generator: tp.Any, duration: int, melody_file: tp.Optional[Path]
) -> tp.Tuple[float, tp.Any]:
    """Our predictor's generation (request, tokens, EnCodec decode) with one decoder."""
    request = service.parse(
        prompt=PROMPT, duration=duration, seed=SEED, input_audio=str(melody_file) if melody_file else None
    )
    clip = service.input_clip(request)
    return timed(service.settings.resolved_device(), lambda: generator.generate(request, clip).tokens)


def run_stock(model: tp.Any, duration: int, melody_wav: tp.Any, device: str) -> tp.Tuple[float, tp.Any]:
    from musicgen_service.generation.seeding import seed_everything

    model.set_generation_params(duration=duration, top_k=250, top_p=0.0, temperature=1.0, cfg_coef=3.0)
    seed_everything(SEED)
    if melody_wav is None:
        return timed(device, lambda: model.generate([PROMPT], return_tokens=True)[1])
    return timed(
        device, lambda: model.generate_with_chroma([PROMPT], melody_wav[None], model.sample_rate, return_tokens=True)[1]
    )


def build_hf(scale: str, device: str, dtype: tp.Any, t5_config: tp.Any) -> tp.Any:
    """transformers' MusicGen with musicgen-<scale>'s configuration (as on the hub), random weights."""
    import torch
    from transformers import (
        EncodecConfig,
        GenerationConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
    )

    dim, heads, layers = models.SCALES[scale]
    decoder = MusicgenDecoderConfig(
        vocab_size=2048,
        max_position_embeddings=2048,
        num_hidden_layers=layers,
        ffn_dim=4 * dim,
        num_attention_heads=heads,
        hidden_size=dim,
        num_codebooks=4,
        activation_function="gelu",
        dropout=0.1,
        scale_embedding=False,
        tie_word_embeddings=False,
        audio_channels=1,
        pad_token_id=2048,
        bos_token_id=2048,
        decoder_start_token_id=2048,
    )
    audio = EncodecConfig(
        sampling_rate=32000,
        audio_channels=1,
        num_filters=64,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048,
        codebook_dim=128,
        hidden_size=128,
        num_lstm_layers=2,
        target_bandwidths=[2.2],
        use_causal_conv=False,
        normalize=False,
        pad_mode="reflect",
        norm_type="weight_norm",
        compress=2,
        chunk_length_s=None,
        overlap=None,
    )
    config = MusicgenConfig.from_sub_models_config(t5_config, audio, decoder)
    config.decoder_start_token_id = config.pad_token_id = 2048
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval().to(device=device, dtype=dtype)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048, do_sample=True, top_k=250, guidance_scale=3.0
    )
    return model


def run_hf(hf: tp.Any, duration: int, device: str) -> float:
    import torch

    steps = duration * 50 + 3  # frames + the delay pattern's 3 extra steps, as audiocraft runs
    input_ids = torch.randint(0, hf.config.text_encoder.vocab_size, (1, 16), device=device)
    torch.manual_seed(SEED)
    seconds, _ = timed(
        device,
        lambda: hf.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps, min_new_tokens=steps
        ),
    )
    return seconds


def profile_stock(model: tp.Any, device: str, seconds: float = 0.6, top: int = 12) -> tp.List[tp.Dict[str, tp.Any]]:
    """Where stock generation spends its time: torch operators, by self time."""
    from torch.profiler import ProfilerActivity, profile

    model.set_generation_params(duration=seconds, top_k=250, cfg_coef=3.0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        model.generate([PROMPT])
    sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": round(getattr(e, key) / 1000, 1),
            "share": round(getattr(e, key) / total, 3),
        }
        for e in events[:top]
    ]


def melody_file(folder: Path, seconds: float = 10.0) -> Path:
    import numpy as np
    import soundfile

    rate = 32000
    notes = [262, 330, 392, 523, 440, 349, 294, 247]
    t = np.arange(int(rate * seconds / len(notes))) / rate
    wav = np.concatenate([0.4 * np.sin(2 * np.pi * f * t) for f in notes]).astype(np.float32)
    path = folder / "melody.wav"
    soundfile.write(str(path), wav, rate)
    return path


def bench_generation(
    cache: Path,
    scale: str,
    melody: bool,
    durations: tp.Sequence[int],
    device: str,
    dtype_name: str,
    bw: tp.Dict[str, float],
    with_hf: bool,
    mbd_seconds: float,
    tmp: Path,
    t5_config: tp.Any,
    modes: tp.Sequence[str],
) -> tp.Dict[str, tp.Any]:
    import torch

    from musicgen_service.core.settings import Settings
    from musicgen_service.generation.generator import Generator
    from musicgen_service.serving.service import Service

    model_id = models.model_id(scale, melody)
    log(f"generation: {model_id} on {device}")
    service = Service(Settings(weights_dir=cache, model=model_id, device=device, mbd="lazy", decoder="stock"))
    model = service.model
    generators = {mode: Generator(model, mode) for mode in modes}
    lm_bytes = streamed_bytes(model.lm)
    floor_s = lm_bytes / (bw["read_GBps"] * 1e9)
    melody_path = melody_file(tmp) if melody else None
    melody_wav = None
    if melody_path is not None:
        import soundfile

        data, _ = soundfile.read(str(melody_path), dtype="float32")
        melody_wav = torch.from_numpy(data)[None].to(model.device)
    rows = []
    reference_tokens = None
    for duration in durations:
        steps = duration * 50 + 3
        stock_s, stock_tokens = run_stock(model, duration, melody_wav, device)
        row: tp.Dict[str, tp.Any] = {
            "duration_s": duration,
            "steps": steps,
            "stock_s": round(stock_s, 2),
            "stock_s_per_step": round(stock_s / steps, 4),
            "floor_s_per_step": round(floor_s, 4),
            "modes": {},
        }
        log(f"  {duration} s: stock audiocraft {stock_s:.1f} s")
        for mode, generator in generators.items():
            seconds, tokens = run_ours(service, generator, duration, melody_path)
            runner = generator.decoder.runner
            # the floor for this decoder's own bytes: its matrices (stock: the LM's parameters)
            mode_floor_s = (runner.step_bytes() if runner is not None else lm_bytes) / (bw["read_GBps"] * 1e9)
            row["modes"][mode] = {
                "decoder": generator.decoder.describe(),
                "s": round(seconds, 2),
                "s_per_step": round(seconds / steps, 4),
                "rtf": round(seconds / duration, 3),
                "speedup_vs_audiocraft": round(stock_s / seconds, 2),
                "same_tokens_as_stock": bool(torch.equal(tokens.cpu(), stock_tokens.cpu())),
                "streamed_MB_per_step": round((runner.step_bytes() if runner is not None else lm_bytes) / 1e6, 1),
                "floor_s_per_step": round(mode_floor_s, 4),
                "fraction_of_floor": round(mode_floor_s / (seconds / steps), 3),
            }
            if generator.decoder.trials:
                row["modes"][mode]["auto_table"] = [t.row() for t in generator.decoder.trials]
            if mode == "exact" and reference_tokens is None:
                reference_tokens = tokens
            log(f"  {duration} s: ours ({generator.decoder.describe()}) {seconds:.1f} s")
        decode_s, _ = timed(device, lambda: model.compression_model.decode(stock_tokens, None))
        row["encodec_decode_s"] = round(decode_s, 3)
        rows.append(row)
    result: tp.Dict[str, tp.Any] = {
        "model": model_id,
        "scale": scale,
        "melody": melody,
        "dtype": dtype_name,
        "lm_params_M": round(sum(p.numel() for p in model.lm.parameters()) / 1e6, 1),
        "streamed_MB_per_step": round(lm_bytes / 1e6, 1),
        "rows": rows,
    }
    exact = generators.get("exact")
    if exact is not None and reference_tokens is not None and not melody:
        from bench.quality import teacher_forced

        result["quality_vs_exact"] = {}
        for mode, generator in generators.items():
            runner = generator.decoder.runner
            if runner is None or runner.exact:
                continue
            with model.autocast:  # exact runs under stock's autocast (fp16 on GPUs); the others turn it off
                q = teacher_forced(model, exact.decoder.runner, runner, PROMPT, reference_tokens)
            mode_tokens = run_ours(service, generator, durations[0], None)[1]
            q["free_running_token_agreement"] = round((mode_tokens == reference_tokens).float().mean().item(), 3)
            result["quality_vs_exact"][mode] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in q.items()}
            log(f"  {mode} vs exact: {result['quality_vs_exact'][mode]}")
    if mbd_seconds and not melody:
        tokens = run_ours(service, generators[modes[0]], 1, None)[1][..., : max(1, int(mbd_seconds * 50))]
        mbd = service.mbd_decoder()
        mbd_s, _ = timed(device, lambda: service.generator.to_audio(tokens, mbd))
        enc_s, _ = timed(device, lambda: service.generator.to_audio(tokens))
        result["mbd"] = {
            "seconds_of_audio": mbd_seconds,
            "mbd_decode_s": round(mbd_s, 3),
            "encodec_decode_s": round(enc_s, 4),
            "mbd_vs_encodec": round(mbd_s / enc_s, 1),
        }
        log(f"  MBD decode of {mbd_seconds} s: {mbd_s:.2f} s (EnCodec {enc_s:.3f} s)")
    if not melody:
        result["profile_stock_top_ops"] = profile_stock(model, device)
    service = model = generators = None  # (freed before the next model loads)
    gc.collect()
    if with_hf and not melody:
        log("  building transformers' MusicGen")
        dtype = getattr(torch, dtype_name)
        hf = build_hf(scale, device, dtype, t5_config)
        run_hf(hf, 1, device)  # warm-up: first-call overheads
        for row in rows:
            hf_s = run_hf(hf, row["duration_s"], device)
            row["transformers_s"] = round(hf_s, 2)
            row["transformers_s_per_step"] = round(hf_s / row["steps"], 4)
            row["transformers_speedup_vs_audiocraft"] = round(row["stock_s"] / hf_s, 2)
            for m in row["modes"].values():
                m["speedup_vs_transformers"] = round(hf_s / m["s"], 2)
            log(f"  {row['duration_s']} s: transformers {hf_s:.1f} s")
        del hf
        gc.collect()
    return result


# ---------------------------------------------------------------------------------------- report


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _decided(q: tp.Dict[str, tp.Any]) -> str:
    if q.get("top1_agreement_decided") is None:
        return ""
    return (
        f" ({q['top1_agreement_decided']:.1%} at the {q['decided_positions']} positions where exact is "
        f"decided, auto's bar)"
    )


def markdown(report: tp.Dict[str, tp.Any]) -> str:
    m = report["machine"]
    lines = [
        f"# MusicGen benchmark ({report['mode']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; device `{report['device']}`.",
        f"Memory bandwidth: read {report['bandwidth']['read_GBps']} GB/s, copy "
        f"{report['bandwidth']['copy_GBps']} GB/s (bytes read + written).",
        "",
    ]
    for cold in report["cold_start"]:
        lines += [
            f"## Cold start: {cold['model']}",
            "",
            "| | imports + setup s | of which imports s | peak RSS MB | final RSS MB |",
            "|---|---|---|---|---|",
        ]
        for key, label in (
            ("stock", "stock `MusicGen.get_pretrained`"),
            ("ours", "ours: model loading"),
            ("ours_full", "ours: whole setup (+ the auto decoder's choice)"),
        ):
            r = cold[key]
            lines.append(f"| {label} | {r['total_s']} | {r['imports_s']} | {r['peak_rss_mb']} | {r['final_rss_mb']} |")
        for name, r in cold.get("per_decoder", {}).items():
            lines.append(
                f"| ours: whole setup, decoder {name} | {r['total_s']} | {r['imports_s']} | "
                f"{r['peak_rss_mb']} | {r['final_rss_mb']} |"
            )
        lines += [
            "",
            f"setup_speedup_vs_stock: {cold['setup_speedup_vs_stock']}x."
            + (
                " Phases of our setup (cProfile attribution, inflated by the profiler): "
                + ", ".join(f"{k} {v} s" for k, v in cold["phases_s"].items())
                + "."
                if cold["phases_s"]
                else ""
            ),
            "",
        ]
    for gen in report["generation"]:
        lines += [
            f"## Generation: {gen['model']} ({gen['lm_params_M']}M LM parameters, "
            f"{'melody' if gen['melody'] else 'text only'})",
            "",
            f"Weights streamed per step: {gen['streamed_MB_per_step']} MB; memory-bandwidth floor "
            f"{gen['rows'][0]['floor_s_per_step'] * 1000:.1f} ms/step. Times include T5 and the EnCodec "
            "decode (both well under 1%).",
            "",
            "| audio s | path | s | s/step | RTF | speedup vs audiocraft | vs transformers | same tokens as stock "
            "| fraction of floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in gen["rows"]:
            lines.append(
                f"| {r['duration_s']} | stock audiocraft | {r['stock_s']} | {r['stock_s_per_step']} | "
                f"{r['stock_s'] / r['duration_s']:.3f} | 1.00x | "
                f"{_x(r['transformers_s'] / r['stock_s']) if 'transformers_s' in r else '-'} | yes | "
                f"{r['floor_s_per_step'] / r['stock_s_per_step']:.3f} |"
            )
            if "transformers_s" in r:
                lines.append(
                    f"| {r['duration_s']} | transformers | {r['transformers_s']} | "
                    f"{r['transformers_s_per_step']} | {r['transformers_s'] / r['duration_s']:.3f} | "
                    f"{_x(r['transformers_speedup_vs_audiocraft'])} | 1.00x | - | "
                    f"{r['floor_s_per_step'] / r['transformers_s_per_step']:.3f} |"
                )
            for m in r["modes"].values():
                lines.append(
                    f"| {r['duration_s']} | ours: {m['decoder']} | {m['s']} | {m['s_per_step']} | {m['rtf']} | "
                    f"{_x(m['speedup_vs_audiocraft'])} | "
                    f"{_x(m['speedup_vs_transformers']) if 'speedup_vs_transformers' in m else '-'} | "
                    f"{'yes' if m['same_tokens_as_stock'] else 'no'} | {m['fraction_of_floor']} |"
                )
        for r in gen["rows"][:1]:
            for mode, m in r["modes"].items():
                if m.get("auto_table"):
                    lines += ["", f"`{mode}` measured at setup ({m['decoder']}): " + "; ".join(m["auto_table"]) + "."]
        lines += [
            "",
            "EnCodec decode: "
            + ", ".join(f"{r['duration_s']} s of audio in {r['encodec_decode_s']} s" for r in gen["rows"])
            + ".",
        ]
        for mode, q in gen.get("quality_vs_exact", {}).items():
            lines += [
                "",
                f"{mode} vs exact, teacher-forced over {q['steps']} steps: KL mean {q['kl_mean']:.2e} "
                f"(max {q['kl_max']:.2e}) nats, total variation {q['total_variation_mean']:.4f}, "
                f"top-1 agreement {q['top1_agreement']:.1%}{_decided(q)}, max |logit diff| "
                f"{q['max_abs_logit_diff']:.3f}; free-running token agreement "
                f"{q['free_running_token_agreement']:.1%}.",
            ]
        if "mbd" in gen:
            b = gen["mbd"]
            lines += [
                "",
                f"MBD decode of {b['seconds_of_audio']:g} s: {b['mbd_decode_s']} s "
                f"(EnCodec {b['encodec_decode_s']} s: {b['mbd_vs_encodec']}x).",
            ]
        if gen.get("profile_stock_top_ops"):
            lines += [
                "",
                "Stock generation, top operators by self time:",
                "",
                "| op | calls | self ms | share |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| `{p['op']}` | {p['calls']} | {p['self_ms']} | {p['share']:.1%} |"
                for p in gen["profile_stock_top_ops"]
            ]
        lines.append("")
    lines.append(f"Total benchmark time: {report['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: xsmall LM, tiny T5, 1-2 s, no melody, no cold-start profile, 0.04 s of MBD",
    )
    parser.add_argument("--scales", default=None, help="comma list of small, medium, large (default: small)")
    parser.add_argument(
        "--melody-scales",
        default=None,
        help="scales to also run with the melody conditioner (default: the first scale)",
    )
    parser.add_argument("--durations", default=None, help="seconds of audio, comma list (default 8,30)")
    parser.add_argument("--melody-durations", default=None, help="for the melody runs (default: 8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        help="LM dtype for transformers' model (default: float32 on CPU, float16 on CUDA, like audiocraft)",
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--modes",
        default="exact,fp16,bf16,int8,auto",
        help="our decoders to run (stock, exact, fp16, bf16, int8, auto)",
    )
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument(
        "--mbd-seconds",
        type=float,
        default=None,
        help="seconds of audio for the MBD decode (default: 0.2 quick, 1 on CPU, 8 on GPU)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work", help="where model sets are kept")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/<mode>)")
    args = parser.parse_args(argv)

    mode = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "cpu")
    scales = (args.scales or ("xsmall" if args.quick else "small")).split(",")
    default_melody = "" if args.quick else scales[0]
    melody_scales = [
        m for m in (args.melody_scales if args.melody_scales is not None else default_melody).split(",") if m
    ]
    durations = [int(d) for d in (args.durations or ("1,2" if args.quick else "8,30")).split(",")]
    melody_durations = [int(d) for d in (args.melody_durations or str(durations[0])).split(",")]
    mbd_seconds = args.mbd_seconds if args.mbd_seconds is not None else {"quick": 0.04, "cpu": 1, "gpu": 8}[mode]
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    cache = (args.work / ("quick" if args.quick else "full")).resolve()
    modes = [m for m in args.modes.split(",") if m]
    out = args.out or ROOT / "bench" / "results" / mode

    from musicgen_service.weights import hub as weights

    weights.use_hub_cache(cache)  # before anything imports the hub libraries
    start = time.perf_counter()
    real_t5 = not args.quick
    for scale in scales:
        models.ensure_set(cache, scale, melody=False, real_t5=real_t5, log=log)
    for scale in melody_scales:
        models.ensure_set(cache, scale, melody=True, real_t5=real_t5, log=log)
    from musicgen_service.tools import tiny

    t5_config = models.real_t5_config() if real_t5 else tiny.tiny_t5_config()

    report: tp.Dict[str, tp.Any] = {
        "mode": mode,
        "device": args.device,
        "machine": machine(),
        "bandwidth": bandwidth(args.device),
        "cold_start": [],
        "generation": [],
    }
    if not args.no_cold_start:
        for scale in scales:
            cold = cold_start(
                cache,
                models.model_id(scale, False),
                args.device,
                profile=not args.quick,
                decoders=[] if args.quick else [m for m in modes if m != "stock"],
            )
            report["cold_start"].append({"model": models.model_id(scale, False), **cold})
    with tempfile.TemporaryDirectory() as tmp:
        for scale in scales:
            report["generation"].append(
                bench_generation(
                    cache,
                    scale,
                    False,
                    durations,
                    args.device,
                    dtype,
                    report["bandwidth"],
                    not args.no_transformers,
                    mbd_seconds,
                    Path(tmp),
                    t5_config,
                    modes,
                )
            )
        for scale in melody_scales:
            report["generation"].append(
                bench_generation(
                    cache,
                    scale,
                    True,
                    melody_durations,
                    args.device,
                    dtype,
                    report["bandwidth"],
                    False,
                    0,
                    Path(tmp),
                    t5_config,
                    modes,
                )
            )
    report["total_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    from musicgen_service.serving import compute

    # every torch call in the thread where the service makes its own (why: musicgen_service/serving/compute.py)
    compute.shared().call(main)
