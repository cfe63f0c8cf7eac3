"""One cold start, in a fresh process: import + ``setup()`` of our predictor (or stock audiocraft's
``MusicGen.get_pretrained``) on a weights folder. Prints one JSON object.

    python bench/coldstart.py --weights DIR --model ID [--device cpu] [--stock] [--profile] [--mbd eager]

``--profile`` runs setup under cProfile and attributes its time to phases (checkpoint read, model
build, T5 load, demucs load, state copy, device transfer) by the cumulative time of the library
functions that do them; without it, the timings are the plain wall clock. Peak RSS is the process'
high-water mark (VmHWM), so it includes the imports.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stock", action="store_true", help="audiocraft's MusicGen.get_pretrained")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--decoder", default="auto", help="our setup's decoder (stock: model loading only)")
    parser.add_argument("--mbd", default="lazy", choices=["lazy", "eager"],
                        help="eager: our setup also loads MultiBand Diffusion (its cost on every boot)")
    args = parser.parse_args()

    from musicgen_service import weights

    weights.use_hub_cache(args.weights)
    start = time.perf_counter()
    import torch  # noqa: F401
    import audiocraft.models  # noqa: F401
    import transformers  # noqa: F401
    imports = time.perf_counter() - start

    from musicgen_service.settings import Settings

    settings = Settings(weights_dir=args.weights, model=args.model, device=args.device, mbd=args.mbd,
                        decoder=args.decoder)
    if args.stock:
        from audiocraft.models import MusicGen

        folder = weights.musicgen_folder(args.weights, args.model)

        def setup() -> object:
            return MusicGen.get_pretrained(str(folder), device=args.device)
    else:
        from musicgen_service.service import Service

        def setup() -> object:
            return Service(settings)

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    loaded = setup()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"imports_s": round(imports, 3), "setup_s": round(seconds, 3),
              "peak_rss_mb": round(status_mb("VmHWM"), 1), "final_rss_mb": round(status_mb("VmRSS"), 1),
              "stock": args.stock, "mbd": args.mbd}
    if profiler is not None:
        import pstats

        profiler.disable()
        result["phases_s"] = phases_from(pstats.Stats(profiler))
    del loaded
    print(json.dumps(result))


if __name__ == "__main__":
    main()
