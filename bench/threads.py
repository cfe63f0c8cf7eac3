"""Why the service runs all torch work in one thread (musicgen_service/serving/compute.py), measured.

    PYTHONPATH=. python bench/threads.py            # kernels of a decoding step, ~20 s
    PYTHONPATH=. python bench/threads.py --step     # + a musicgen-small int8 step (needs bench/work/full)

Each kernel is timed, in one process, in the thread that owns torch's only
OpenMP team, then in a second thread (as when setup ran in the main thread and a
prediction runs in a thread serving it: two teams alive). ``--step`` does the same
for whole batched decoding steps of musicgen-small (the set bench/run.py writes).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def kernels() -> tp.Dict[str, tp.Callable[[], tp.Any]]:
    import torch
    import torch.nn.functional as F

    x = torch.randn(16, 1, 1024)
    norm = torch.nn.LayerNorm(1024)
    h = torch.randn(16, 4096)
    w = torch.randn(4096, 1024)
    wi = torch.randint(-127, 127, (4096, 1024), dtype=torch.int8)
    scales = torch.rand(4096, dtype=torch.bfloat16)
    xb = torch.randn(2, 1024, dtype=torch.bfloat16)
    q, k = torch.randn(2, 16, 1, 64), torch.randn(2, 16, 500, 64)
    return {
        "layer_norm [16,1,1024]": lambda: norm(x),
        "gelu [16,4096]": lambda: F.gelu(h),
        "linear fp32 [2,1024]x[4096,1024]": lambda: F.linear(x[:2, 0], w),
        "int8 weight-only [2,1024]x[4096,1024]": lambda: torch._weight_int8pack_mm(xb, wi, scales),
        "attention 1 query, 500 keys": lambda: F.scaled_dot_product_attention(q, k, k),
    }


def per_call_us(fn: tp.Callable[[], tp.Any], seconds: float = 1.0) -> float:
    import torch

    with torch.no_grad():
        for _ in range(20):
            fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
    return 1e6 * (time.perf_counter() - start) / n


def in_thread(fn: tp.Callable[[], tp.Any]) -> tp.Any:
    box: tp.List[tp.Any] = []
    worker = threading.Thread(target=lambda: box.append(fn()))
    worker.start()
    worker.join()
    return box[0]


def step_ms() -> tp.Callable[[], float]:
    """A batched decoding step of one request on musicgen-small, int8 (what bench/concurrency.py runs)."""
    from musicgen_service.core.settings import Settings
    from musicgen_service.decoding.rows import Row, RowDecoder
    from musicgen_service.generation.generator import Generator
    from musicgen_service.generation.request import parse_request
    from musicgen_service.weights import hub as weights
    from musicgen_service.weights.loading import load_musicgen

    cache = ROOT / "bench" / "work" / "full"
    weights.use_hub_cache(cache)
    settings = Settings(weights_dir=cache, model="facebook/musicgen-small", device="cpu", mbd="off", decoder="int8")
    model = load_musicgen(settings.weights_dir, settings.model, "cpu")
    generator = Generator(model, "int8")
    rows = RowDecoder(generator.decoder.runner, 1)

    def measure() -> float:
        request = parse_request(generator.capabilities(30, "off"), prompt="x", duration=4, seed=0)
        prepared = generator.condition(request, tensors=True)
        row = Row(
            condition_tensors=prepared.condition_tensors,
            prompt=None,
            max_gen_len=prepared.new_frames,
            seed=0,
            temp=1.0,
            top_k=250,
            top_p=0.0,
            cfg_coef=3.0,
        )
        rows.admit(row)
        return per_call_us(lambda: rows.step([row]), seconds=3.0) / 1000

    return measure


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from bench.run import machine

    m = machine()
    print(
        f"# torch work in one thread vs a second thread ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"{torch.get_num_threads()} threads)\n"
    )
    print("| work | the only team's thread | a second thread | slower by |\n|---|---|---|---|")
    for name, fn in kernels().items():
        one, two = per_call_us(fn), in_thread(lambda: per_call_us(fn))
        print(f"| {name} | {one:.1f} us | {two:.1f} us | {two / one:.2f}x |", flush=True)
    if args.step:
        measure = step_ms()
        one, two = measure(), in_thread(measure)
        print(f"| musicgen-small int8 decoding step | {one:.1f} ms | {two:.1f} ms | {two / one:.2f}x |")


if __name__ == "__main__":
    main()
