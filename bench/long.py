"""Long outputs: what decoding costs as the audio grows, chunked (``musicgen_service.audio.codec``)
against audiocraft's one-shot ``EncodecModel.decode``, on the real-size EnCodec (MusicGen's
32 kHz encodec_large_nq4_s640, random weights: cost does not depend on weight values).

    python bench/long.py                              # CPU, all parts (~15 min on 2 cores)
    python bench/long.py --parts seams,scaling --durations 10,30 --oneshot-max 30
    python bench/long.py --device cuda --oneshot-max 300 --out $OUT/long-gpu

Parts (``--parts``):
- ``seams``: chunked vs one-shot decode of the same tokens, mono and stereo (interleaved):
  SNR in dB over the whole output, worst sample error within one frame (640 samples) of a seam
  and elsewhere; then the same with the context margins capped at 0..N frames (how the margins
  were chosen: the smallest that is exact, and the computed bound must be at least that).
- ``chunks``: chunk length sweep, 60 s mono: seconds of decode per second of audio, peak memory.
- ``scaling``: 10..300 s, mono and stereo, chunked; one-shot up to ``--oneshot-max`` seconds
  (mono; longer ones would not fit a shared 24 GB machine, so they are not run on the CPU).
- ``linearity``: in one process at torch's default threads, stereo, 10 s decoded five times then
  300 s once: the median time of the decode's chunks per second of audio (steady on a shared
  machine, where whole decodes at 2 threads vary several-fold).
- ``mbd``: MultiBand Diffusion's windows on the tiny random MBD: correlation of overlapping
  windows, the level at each join (correlation-corrected vs plain equal-power crossfade).
- ``predict``: the whole prediction (``Service.predict``) on the tiny test set at 60 and 300 s,
  stereo default model: seconds, decode seconds, peak RSS.

Every memory figure comes from a fresh process: on the CPU the peak resident set (VmHWM) less
the resident set before the measured call; on CUDA ``torch.cuda.max_memory_allocated`` less
what was allocated before. Times are the best of ``repeats`` calls in that process, after a
1 s warm-up decode, as wall clock and as the process' CPU time (all threads; steadier than the
wall clock on a machine that others share). Writes ``--out``.md / .json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.coldstart import status_mb  # noqa: E402

FRAME_RATE = 50
HOP = 640


def log(message: str) -> None:
    print(f"[long] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- in the child


def build_codec(name: str, channels: int, device: str) -> tp.Any:
    from audiocraft.models.encodec import InterleaveStereoCompressionModel

    from bench import models
    from musicgen_service.tools import tiny

    model = tiny.build_encodec(models.REAL_ENCODEC if name == "real" else tiny.encodec_config())
    if channels == 2:
        model = InterleaveStereoCompressionModel(model)
    return model.to(device)


def random_codes(model: tp.Any, seconds: float, device: str, seed: int = 1) -> tp.Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cardinality, (1, model.num_codebooks, int(seconds * FRAME_RATE)), generator=g).to(
        device
    )


def decoder(path: str, chunk: int) -> tp.Callable[[tp.Any, tp.Any], tp.Any]:
    from musicgen_service.audio import codec

    if path == "oneshot":
        return lambda model, codes: model.decode(codes, None).float().cpu()
    return lambda model, codes: codec.decode(model, codes, chunk)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def steady_chunk_times() -> tp.List[float]:
    """Record the wall time of every chunk of the chunked decode but the streams' last ones (all
    the same work): their median is a cost per second of audio that other processes' bursts on a
    shared machine barely move, unlike the whole decode's time."""
    from musicgen_service.audio import codec

    times: tp.List[float] = []
    push = codec._Stream.push

    def timed(self: tp.Any, x: tp.Any, last: bool = False) -> tp.Any:
        start = time.perf_counter()
        y = push(self, x, last)
        if y is not None and not last:
            times.append(time.perf_counter() - start)
        return y

    codec._Stream.push = timed  # type: ignore[method-assign]
    return times


def child_decode(spec: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model = build_codec(spec["codec"], spec["channels"], device)
    run = decoder(spec["path"], spec["chunk"])
    codes = random_codes(model, spec["seconds"], device)
    chunk_times = steady_chunk_times()
    with torch.inference_mode():
        run(model, codes[..., :FRAME_RATE])  # warm-up: kernels, first-call allocations
        sync(device)
        chunk_times.clear()
        rss_before = status_mb("VmRSS")
        gpu_before = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times, cpu_times = [], []
        for _ in range(spec["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            wav = run(model, codes)
            sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            del wav
    best = min(times)
    out = {
        "s": round(best, 3),
        "s_per_s": round(best / spec["seconds"], 4),
        "all_s": [round(t, 3) for t in times],
        "cpu_s_per_s": round(min(cpu_times) / spec["seconds"], 4),
        "peak_rss_mb": round(status_mb("VmHWM")),
        "rss_before_mb": round(rss_before),
        "above_mb": round(status_mb("VmHWM") - rss_before),
    }
    if chunk_times:  # each steady chunk is chunk / 50 s of one channel
        median = sorted(chunk_times)[len(chunk_times) // 2]
        out["median_chunk_s_per_s"] = round(median * spec["channels"] * FRAME_RATE / spec["chunk"], 4)
    if device.startswith("cuda"):
        out["gpu_above_mb"] = round((torch.cuda.max_memory_allocated() - gpu_before) / 2**20)
    return out


def child_linearity(spec: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """In one process, at torch's default threads: short decodes, then one long one, both chunked;
    the median chunk time per second of audio of each (see :func:`steady_chunk_times`)."""
    import torch

    from musicgen_service.audio import codec

    model = build_codec(spec["codec"], spec["channels"], spec["device"])
    times = steady_chunk_times()
    result = {}
    with torch.inference_mode():
        codec.decode(model, random_codes(model, 2, spec["device"]))
        for seconds, repeats in ((spec["short"], 5), (spec["long"], 1)):
            codes = random_codes(model, seconds, spec["device"])
            times.clear()
            start = time.perf_counter()
            for _ in range(repeats):
                codec.decode(model, codes)
            ordered = sorted(times)
            per_s = spec["channels"] * FRAME_RATE / codec.CHUNK_FRAMES
            result[str(seconds)] = {
                "chunks": len(ordered),
                "wall_s_per_s": round((time.perf_counter() - start) / repeats / seconds, 4),
                "p25_chunk_s_per_s": round(ordered[len(ordered) // 4] * per_s, 4),
                "median_chunk_s_per_s": round(ordered[len(ordered) // 2] * per_s, 4),
            }
    result["threads"] = torch.get_num_threads()
    return result


def snr_db(ref: tp.Any, x: tp.Any) -> float:
    import torch

    noise = (ref.double() - x.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return round(10 * torch.log10(ref.double().pow(2).sum() / noise).item(), 1)


def child_seams(spec: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """Chunked vs one-shot on the same tokens; seams are where the chunked decode's pieces meet
    (recorded from the stream), errors within one frame of a seam vs the rest."""
    import torch

    from musicgen_service.audio import codec

    device = spec["device"]
    model = build_codec(spec["codec"], spec["channels"], device)
    codes = random_codes(model, spec["seconds"], device)
    with torch.inference_mode():
        ref = model.decode(codes, None).float().cpu()
    pushes = codec._Stream.push
    pieces: tp.List[tp.Tuple[int, bool]] = []  # (length, last piece of its stream)

    def recording(self: tp.Any, x: tp.Any, last: bool = False) -> tp.Any:
        y = pushes(self, x, last)
        if y is not None:
            pieces.append((y.shape[-1], last))
        return y

    def measure() -> tp.Dict[str, tp.Any]:
        pieces.clear()
        out = codec.decode(model, codes, spec["chunk"])
        seams, position = set(), 0
        for n, last in pieces:  # stereo: the same positions in each channel's stream
            position = 0 if last else position + n
            if not last:
                seams.add(position)
        err = (out - ref).abs()[0].amax(dim=0)  # worst over channels, per sample
        near = torch.zeros_like(err, dtype=torch.bool)
        for s in seams:
            near[max(s - HOP, 0) : s + HOP] = True
        return {
            "snr_db": snr_db(ref, out),
            "seams": len(seams),
            "max_err_near_seams": float(err[near].max()),
            "max_err_elsewhere": float(err[~near].max()),
            "ref_rms": round(float(ref.pow(2).mean().sqrt()), 4),
        }

    codec._Stream.push = recording  # type: ignore[method-assign]
    try:
        result = {"default": measure(), "margins": {}}
        bound = codec.receptive_frames
        for cap in spec["margins"]:
            codec.receptive_frames = lambda layers, unit, cap=cap: (
                min(bound(layers, unit)[0], cap),
                bound(layers, unit)[1],
            )
            try:
                result["margins"][str(cap)] = measure()
            finally:
                codec.receptive_frames = bound
        stages = codec._Stream(codec._mono_codec(model)[0].decoder.model).stages
        result["computed_margins"] = [s.margin // s.unit for s in stages if isinstance(s, codec._Local)]
    finally:
        codec._Stream.push = pushes  # type: ignore[method-assign]
    return result


def child_predict(spec: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    from musicgen_service.weights import hub as weights

    folder = Path(spec["weights"])
    weights.use_hub_cache(folder)
    from musicgen_service.core.settings import Settings
    from musicgen_service.generation.generator import Generator
    from musicgen_service.serving.service import Service

    service = Service(Settings(weights_dir=folder, model=spec["model"], device=spec["device"]))
    decode_s: tp.List[float] = []
    real_decode = Generator.decode

    def timed_decode(self: tp.Any, tokens: tp.Any, mbd: tp.Any = None) -> tp.Any:
        start = time.perf_counter()
        wav = real_decode(self, tokens, mbd)
        decode_s.append(time.perf_counter() - start)
        return wav

    Generator.decode = timed_decode  # type: ignore[method-assign]
    rss_before = status_mb("VmRSS")
    start = time.perf_counter()
    path = service.predict(prompt="lo-fi beat", duration=spec["seconds"], seed=1, output_format=spec["format"])
    total = time.perf_counter() - start
    return {
        "s": round(total, 2),
        "decode_s": round(decode_s[0], 2),
        "peak_rss_mb": round(status_mb("VmHWM")),
        "rss_before_mb": round(rss_before),
        "file_mb": round(path.stat().st_size / 1e6, 1),
    }


def child_mbd(spec: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    """MultiBand Diffusion's windows (tiny random MBD of the test set, windows shrunk to fit a
    CPU): MBD samples fresh noise at each diffusion step, so two one-shot decodes of the same
    tokens already differ; what a join can get wrong is the level where two windows overlap."""
    import torch

    from musicgen_service.audio import mbd as multiband
    from musicgen_service.weights import hub as weights

    folder = Path(spec["weights"])
    weights.use_hub_cache(folder)
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.service import Service

    service = Service(Settings(weights_dir=folder, model="facebook/musicgen-small", device=spec["device"], mbd="eager"))
    mbd = service.mbd_decoder()
    codes = random_codes(service.model.compression_model, spec["seconds"], spec["device"])
    window, overlap = int(spec["window"] * FRAME_RATE), int(spec["overlap"] * FRAME_RATE)
    with torch.inference_mode():
        torch.manual_seed(1)
        one_shot = mbd.tokens_to_wav(codes).float().cpu()
        torch.manual_seed(2)
        other_seed = mbd.tokens_to_wav(codes).float().cpu()
        torch.manual_seed(1)
        starts = list(range(0, codes.shape[-1] - overlap, window - overlap))
        pieces = [mbd.tokens_to_wav(codes[..., s : s + window]).float().cpu() for s in starts]
    rows: tp.Dict[str, tp.Any] = {"snr_one_shot_vs_other_seed_db": snr_db(one_shot, other_seed)}
    for name, correlated in (("corrected", True), ("equal_power", False)):
        out = multiband.crossfade(pieces, overlap * HOP, correlated)
        swell = []
        for s in starts[1:]:  # the middle half of each overlap, against the one-shot's level there
            middle = slice((s + overlap // 4) * HOP, (s + 3 * overlap // 4) * HOP)
            swell.append(10 * math.log10(out[..., middle].pow(2).mean() / one_shot[..., middle].pow(2).mean()))
        rows[name] = {"snr_vs_one_shot_db": snr_db(one_shot, out), "seam_level_db": [round(x, 2) for x in swell]}
    rows["window_correlation"] = [
        round(
            float(
                (a[..., -overlap * HOP :] * b[..., : overlap * HOP]).sum()
                / (a[..., -overlap * HOP :].norm() * b[..., : overlap * HOP].norm())
            ),
            3,
        )
        for a, b in zip(pieces, pieces[1:])
    ]
    return rows


CHILDREN = {
    "decode": child_decode,
    "seams": child_seams,
    "predict": child_predict,
    "mbd": child_mbd,
    "linearity": child_linearity,
}


# ------------------------------------------------------------------------------- in the parent


def child(spec: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"{spec} -> {result}")
    return {**spec, **result}


def markdown(report: tp.Dict[str, tp.Any]) -> str:
    m = report["machine"]
    lines = [
        "# Long outputs: chunked EnCodec decoding",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (torch threads in the decode "
        f"timings: {report.get('threads', '-')})"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; device `{report['device']}`. "
        + ("Real-size EnCodec" if report.get("codec", "real") == "real" else "The tiny test set's EnCodec")
        + " (random weights) unless named; times are the best of the repeats in one process; memory is the "
        "peak above the process' resident set (GPU: allocated) before the call, each in a fresh process.",
        "",
    ]
    if report.get("seams"):
        lines += [
            "## Seams: chunked vs one-shot, same tokens",
            "",
            "| channels | audio s | chunk frames | margins (frames) | SNR dB | seams | worst error near seams "
            "| worst error elsewhere | signal RMS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["seams"]:
            d = r["default"]
            lines.append(
                f"| {r['channels']} | {r['seconds']} | {r['chunk']} | computed {r['computed_margins']} | "
                f"{d['snr_db']} | {d['seams']} | {d['max_err_near_seams']:.1e} | "
                f"{d['max_err_elsewhere']:.1e} | {d['ref_rms']} |"
            )
            for cap, c in r["margins"].items():
                lines.append(
                    f"| {r['channels']} | {r['seconds']} | {r['chunk']} | capped at {cap} | {c['snr_db']} | "
                    f"{c['seams']} | {c['max_err_near_seams']:.1e} | {c['max_err_elsewhere']:.1e} | |"
                )
        lines.append("")
    if report.get("chunks"):
        lines += [
            "## Chunk length (60 s mono, chunked)",
            "",
            "| chunk frames | chunk s | decode s | s per s of audio "
            "| CPU s per s | peak above MB |" + (" GPU peak above MB |" if report["device"] != "cpu" else ""),
            "|---|---|---|---|---|---|" + ("---|" if report["device"] != "cpu" else ""),
        ]
        for r in report["chunks"]:
            lines.append(
                f"| {r['chunk']} | {r['chunk'] / FRAME_RATE:g} | {r['s']} | {r['s_per_s']} | {r['cpu_s_per_s']} | "
                f"{r['above_mb']} |" + (f" {r['gpu_above_mb']} |" if "gpu_above_mb" in r else "")
            )
        lines.append("")
    if report.get("scaling"):
        lines += [
            "## Cost against length",
            "",
            "Median chunk: the median time of the decode's chunks (all the same "
            "work) per second of audio, steadier than the whole decode's time when other processes share the "
            "machine.",
            "",
            "| path | channels | audio s | decode s | s per s of audio | vs 10 s | CPU s per s | "
            "vs 10 s | median chunk s per s | vs 10 s | peak above MB | peak RSS MB |"
            + (" GPU peak above MB |" if report["device"] != "cpu" else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if report["device"] != "cpu" else ""),
        ]
        ten = {(r["path"], r["channels"]): r for r in report["scaling"] if r["seconds"] == 10}

        def vs_ten(r: tp.Dict[str, tp.Any], key: str) -> str:
            base = ten.get((r["path"], r["channels"]))
            return f"{r[key] / base[key]:.2f}x" if base and key in r else "-"

        for r in report["scaling"]:
            lines.append(
                f"| {r['path']} | {r['channels']} | {r['seconds']:g} | {r['s']} | {r['s_per_s']} | "
                f"{vs_ten(r, 's_per_s')} | {r['cpu_s_per_s']} | {vs_ten(r, 'cpu_s_per_s')} | "
                f"{r.get('median_chunk_s_per_s', '-')} | {vs_ten(r, 'median_chunk_s_per_s')} | {r['above_mb']} | "
                f"{r['peak_rss_mb']} |" + (f" {r['gpu_above_mb']} |" if "gpu_above_mb" in r else "")
            )
        lines.append("")
    if report.get("linearity"):
        r = report["linearity"]
        short, long = (r[k] for k in sorted((k for k in r if k.isdigit()), key=int))
        lines += [
            f"## Linearity at {r['threads']} threads (stereo, one process: 10 s decoded 5 times, then 300 s)",
            "",
            "| audio s | chunks timed | wall s per s | p25 chunk s per s | median chunk s per s |",
            "|---|---|---|---|---|",
        ]
        for k in sorted((k for k in r if k.isdigit()), key=int):
            lines.append(
                f"| {k} | {r[k]['chunks']} | {r[k]['wall_s_per_s']} | {r[k]['p25_chunk_s_per_s']} | "
                f"{r[k]['median_chunk_s_per_s']} |"
            )
        lines += [
            "",
            f"Median chunk, 300 s against 10 s: {long['median_chunk_s_per_s'] / short['median_chunk_s_per_s']:.2f}x "
            f"(p25: {long['p25_chunk_s_per_s'] / short['p25_chunk_s_per_s']:.2f}x).",
            "",
        ]
    if report.get("mbd"):
        b = report["mbd"]
        lines += [
            "## MultiBand Diffusion windows (tiny random MBD, 8 s in 2 s windows, 0.5 s overlaps)",
            "",
            f"Two one-shot decodes of the same tokens (other seed): SNR {b['snr_one_shot_vs_other_seed_db']} dB, "
            "so no SNR bar applies to MBD. Correlation of two windows' renderings over their overlap: "
            f"{b['window_correlation']}. Level in the middle of each join against the one-shot decode there:",
            "",
            "| join | SNR vs one-shot dB | level at each join, dB |",
            "|---|---|---|",
        ]
        for name in ("corrected", "equal_power"):
            lines.append(f"| {name.replace('_', ' ')} | {b[name]['snr_vs_one_shot_db']} | {b[name]['seam_level_db']} |")
        lines.append("")
    if report.get("predict"):
        lines += [
            f"## Whole prediction, tiny set (stereo default model; torch's default {m['torch_threads']} threads)",
            "",
            "| audio s | format | total s | decode s | peak RSS MB | file MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["predict"]:
            lines.append(
                f"| {r['seconds']} | {r['format']} | {r['s']} | {r['decode_s']} | {r['peak_rss_mb']} | {r['file_mb']} |"
            )
        lines.append("")
    lines.append(f"Total benchmark time: {report['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="seams,chunks,scaling,linearity,mbd,predict")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--codec",
        default="real",
        choices=["real", "tiny"],
        help="the EnCodec decoded: MusicGen's real size, or the tiny test set's (smoke runs)",
    )
    parser.add_argument("--durations", default="10,30,60,120,300")
    parser.add_argument("--oneshot-max", type=float, default=60, help="longest one-shot decode to run (mono)")
    parser.add_argument("--chunks", default="50,100,250,500,1000")
    parser.add_argument("--chunk", type=int, default=None, help="chunk frames (default: codec.CHUNK_FRAMES)")
    parser.add_argument("--seam-seconds", type=float, default=30)
    parser.add_argument("--predict", default="60:wav,300:wav,300:mp3", help="seconds:format of the predictions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in the decode measurements "
        "(default: torch's; 1 gives the steadiest CPU times on a shared machine)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the parts of --out's JSON that this run "
        "does not measure (e.g. predictions taken at 2 threads next to 1-thread decodes)",
    )
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["what"]](spec)))
        return

    from bench.run import machine
    from musicgen_service.audio import codec

    chunk = args.chunk or codec.CHUNK_FRAMES
    parts = args.parts.split(",")
    durations = [float(d) for d in args.durations.split(",")]
    base = {"device": args.device, "codec": args.codec, "chunk": chunk, "threads": args.threads}
    report: tp.Dict[str, tp.Any] = {
        "device": args.device,
        "codec": args.codec,
        "machine": machine(),
        "chunk_frames": chunk,
    }
    if "chunks" in parts or "scaling" in parts:
        report["threads"] = args.threads or machine()["torch_threads"]
    start = time.perf_counter()
    if "seams" in parts:
        report["seams"] = [
            child({**base, "what": "seams", "channels": c, "seconds": args.seam_seconds, "margins": [0, 1, 2, 3, 4]})
            for c in (1, 2)
        ]
    if "chunks" in parts:
        report["chunks"] = [
            child(
                {
                    **base,
                    "what": "decode",
                    "path": "chunked",
                    "channels": 1,
                    "seconds": 60,
                    "chunk": c,
                    "repeats": args.repeats,
                }
            )
            for c in map(int, args.chunks.split(","))
        ]
    if "scaling" in parts:
        rows = []
        for seconds in durations:
            repeats = args.repeats if seconds <= 60 else max(1, args.repeats - 1)
            for channels in (1, 2):
                rows.append(
                    child(
                        {
                            **base,
                            "what": "decode",
                            "path": "chunked",
                            "channels": channels,
                            "seconds": seconds,
                            "repeats": repeats,
                        }
                    )
                )
            if seconds <= args.oneshot_max:
                rows.append(
                    child(
                        {
                            **base,
                            "what": "decode",
                            "path": "oneshot",
                            "channels": 1,
                            "seconds": seconds,
                            "repeats": repeats,
                        }
                    )
                )
                if args.device != "cpu":
                    rows.append(
                        child(
                            {
                                **base,
                                "what": "decode",
                                "path": "oneshot",
                                "channels": 2,
                                "seconds": seconds,
                                "repeats": repeats,
                            }
                        )
                    )
        report["scaling"] = sorted(rows, key=lambda r: (r["path"], r["channels"], r["seconds"]))
    if "linearity" in parts:
        report["linearity"] = child(
            {"what": "linearity", "device": args.device, "codec": args.codec, "channels": 2, "short": 10, "long": 300}
        )
    folder = (args.work / "tiny").resolve()
    if ("predict" in parts or "mbd" in parts) and not (folder / "models--t5-base").exists():
        from musicgen_service.tools import tiny

        tiny.write_tiny_set(folder)
    if "mbd" in parts:
        report["mbd"] = child(
            {"what": "mbd", "device": args.device, "weights": str(folder), "seconds": 8, "window": 2, "overlap": 0.5}
        )
    if "predict" in parts:
        report["predict"] = [
            child(
                {
                    "what": "predict",
                    "device": args.device,
                    "weights": str(folder),
                    "model": "facebook/musicgen-stereo-melody-large",
                    "seconds": int(s),
                    "format": f,
                }
            )
            for s, f in (p.split(":") for p in args.predict.split(","))
        ]
    report["total_s"] = time.perf_counter() - start
    if args.merge and args.out.with_suffix(".json").exists():
        old = json.loads(args.out.with_suffix(".json").read_text())
        report = {
            **old,
            **report,
            "total_s": old["total_s"] + report["total_s"],
            "runs": old.get("runs", [{k: old[k] for k in ("threads", "chunk_frames") if k in old}])
            + [{"parts": parts, "threads": report.get("threads"), "chunk_frames": chunk}],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    from musicgen_service.serving import compute

    # every torch call in the thread where the service makes its own (why: musicgen_service/serving/compute.py)
    compute.shared().call(main)
