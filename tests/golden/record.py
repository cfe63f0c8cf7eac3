"""Record golden outputs: for a fixed set of requests on the tiny model set, each output file's bytes
and the LM's tokens, as sha256 digests (tests/test_golden.py compares them across changes).

    python tests/golden/record.py WEIGHTS_DIR OUT.json

Run with the package to record on ``sys.path`` (the project root, or an exported older commit of it:
``test_golden.py`` exports the baseline commit and runs *that* commit's copy of this script, so that
each recorder matches the code it records). Only this file knows the service's internal API; when the
code moves, this file follows it (its requests and what it records stay the same).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import typing as tp
import wave
from pathlib import Path

# the requests: (case name, model, decoder, settings, inputs)
STEREO = "facebook/musicgen-stereo-melody-large"
MONO_TEXT = "facebook/musicgen-small"
BASE = dict(prompt="lo-fi beat with warm piano", duration=3, seed=1234)

CASES: tp.List[tp.Tuple[str, str, str, tp.Dict[str, tp.Any]]] = [
    # (name, model, decoder, inputs)
    ("text-exact", STEREO, "exact", dict(BASE)),
    ("text-auto-mp3", STEREO, "auto", dict(BASE, output_format="mp3")),
    ("text-fp16", STEREO, "fp16", dict(BASE)),
    ("text-bf16", STEREO, "bf16", dict(BASE)),
    ("text-int8", STEREO, "int8", dict(BASE)),
    ("text-int8dyn", STEREO, "int8dyn", dict(BASE)),
    ("text-stock", STEREO, "stock", dict(BASE)),
    (
        "text-sampling-peak",
        STEREO,
        "exact",
        dict(BASE, top_k=0, top_p=0.9, temperature=0.7, classifier_free_guidance=5, normalization_strategy="peak"),
    ),
    ("melody-auto", STEREO, "auto", dict(BASE, input_audio="@melody")),
    (
        "continuation-auto",
        STEREO,
        "auto",
        dict(BASE, input_audio="@melody", continuation=True, continuation_start=1, continuation_end=4),
    ),
    ("past-window-exact", MONO_TEXT, "exact", dict(BASE, duration=35, normalization_strategy="rms")),
    ("mbd-exact", STEREO, "exact", dict(BASE, duration=2, multi_band_diffusion=True)),
    ("lora-auto", MONO_TEXT, "auto", dict(BASE, trained="@lora")),
    ("lora-exact-clip", MONO_TEXT, "exact", dict(BASE, trained="@lora", normalization_strategy="clip")),
]
# two requests at once on a server of two slots (they share decoding steps where the decoder batches)
CONCURRENT = [("concurrent-bf16", STEREO, "bf16", [dict(BASE, seed=5), dict(BASE, seed=6, duration=2)])]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def melody_file(folder: Path) -> Path:
    """5 s of a two-note stereo melody, 16-bit PCM at 32 kHz (deterministic)."""
    import numpy as np

    rate = 32000
    t = np.arange(5 * rate) / rate
    freq = np.where(t < 2.5, 440.0, 660.0)
    x = 0.4 * np.sin(2 * math.pi * freq * t)
    pcm = (np.stack([x, 0.8 * x], axis=1) * 32767).round().astype("<i2")
    path = folder / "melody.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def lora_file(folder: Path, weights_dir: Path, model: str) -> Path:
    """A LoRA trained file for ``model``, written straight in the trained-file format (safetensors with
    its manifest): rank 4 on every self-attention q/k/v and output head, seeded values."""
    import torch
    from safetensors.torch import save_file

    from musicgen_service.weights import hub as weights

    lm_file = weights.musicgen_folder(weights_dir, model) / weights.LM_FILE
    state = torch.load(lm_file, map_location="cpu", mmap=True, weights_only=True)["best_state"]
    gen = torch.Generator().manual_seed(99)
    rank = 4
    tensors = {}
    for name in sorted(state):
        if name.endswith("self_attn.in_proj_weight") or (name.startswith("linears.") and name.endswith(".weight")):
            out, inp = state[name].shape
            tensors[f"{name}.lora_A"] = (torch.randn(rank, inp, generator=gen) / inp**0.5).half()
            tensors[f"{name}.lora_B"] = (torch.randn(out, rank, generator=gen) * 0.05).half()
    manifest = {
        "format": "musicgen-cog-trained/1",
        "base_model": model,
        "base_checkpoint": weights.checkpoint_identity(lm_file),
        "method": "lora",
        "rank": rank,
        "alpha": float(rank),
        "targets": sorted({n.rsplit(".lora_", 1)[0] for n in tensors}),
        "training": {"steps": 1},
        "final_loss": 1.0,
    }
    path = folder / "golden-lora.safetensors"
    save_file(tensors, str(path), metadata={"musicgen_manifest": json.dumps(manifest)})
    return path


# ------------------------------------------------------------------ the service's API (follows the code)


def make_service(
    weights_dir: Path, model: str, decoder: str, trained: tp.Optional[Path], concurrency: int = 1
) -> tp.Any:
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.service import Service

    return Service(
        Settings(
            weights_dir=weights_dir,
            model=model,
            device="cpu",
            decoder=decoder,
            concurrency=concurrency,
            prepared_off=True,
        ),
        trained=str(trained) if trained else None,
    )


def tokens_of(service: tp.Any, request: tp.Any) -> tp.Any:
    """The LM's tokens for a request, alone (the service's own steps before decoding)."""

    def work() -> tp.Any:
        conditioned = service.generator.condition(request, service.input_clip(request))
        return service.generator.tokens(conditioned)

    return service.compute.call(work)


def output_of(service: tp.Any, request: tp.Any) -> Path:
    return Path(service.run(request))


# ------------------------------------------------------------------ recording


def record(weights_dir: Path) -> tp.Dict[str, tp.Any]:
    from musicgen_service.weights import hub as weights

    weights.use_hub_cache(weights_dir)
    work = Path(tempfile.mkdtemp(prefix="musicgen-golden-"))
    files = {"@melody": melody_file(work), "@lora": lora_file(work, weights_dir, MONO_TEXT)}
    results: tp.Dict[str, tp.Any] = {}
    services: tp.Dict[tp.Tuple[str, str, tp.Optional[str]], tp.Any] = {}

    def resolve(inputs: tp.Dict[str, tp.Any]) -> tp.Tuple[tp.Dict[str, tp.Any], tp.Optional[Path]]:
        inputs = dict(inputs)
        trained = inputs.pop("trained", None)
        if isinstance(inputs.get("input_audio"), str):
            inputs["input_audio"] = files[inputs["input_audio"]]
        return inputs, (files[trained] if trained else None)

    for name, model, decoder, raw in CASES:
        inputs, trained = resolve(raw)
        key = (model, decoder, str(trained))
        if key not in services:
            services.clear()  # one service at a time (memory)
            services[key] = make_service(weights_dir, model, decoder, trained)
        service = services[key]
        request = service.parse(**inputs)
        tokens = tokens_of(service, request)
        path = output_of(service, request)
        results[name] = {
            "tokens": sha(tokens.cpu().numpy().astype("<i8").tobytes()),
            "tokens_shape": list(tokens.shape),
            "output": sha(path.read_bytes()),
            "suffix": path.suffix,
            "bytes": path.stat().st_size,
        }
        if decoder == "auto":  # what auto measured and chose on this machine, this time
            results[name]["chose"] = service.generator.decoder.mode
        print(f"golden: {name}: {results[name]['output'][:12]} tokens {results[name]['tokens'][:12]}", flush=True)
    services.clear()
    for name, model, decoder, requests in CONCURRENT:
        service = make_service(weights_dir, model, decoder, None, concurrency=len(requests))
        parsed = [service.parse(**resolve(r)[0]) for r in requests]
        outs: tp.List[tp.Any] = [None] * len(parsed)
        barrier = threading.Barrier(len(parsed))

        def one(i: int) -> None:
            barrier.wait()
            outs[i] = output_of(service, parsed[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(parsed))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results[name] = {"outputs": [sha(Path(p).read_bytes()) for p in outs]}
        print(f"golden: {name}: {[o[:12] for o in results[name]['outputs']]}", flush=True)
    return results


def machine() -> tp.Dict[str, tp.Any]:
    """What the recorded bits depend on besides the code: the CPU, torch and its threads."""
    import torch

    model, flags = "", ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags_sha256": sha(flags.encode())[:16],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    weights_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ.setdefault("MUSICGEN_DEVICE", "cpu")
    result = {"machine": machine(), "cases": record(weights_dir)}
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
