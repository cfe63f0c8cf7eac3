"""Peak memory of preparing a training dataset of hours: the segments held (how datasets were read
before: every 30 s segment decoded and kept until tokenized) against decoding and tokenizing as it
goes (training/dataset.py's plan, then segments tokenized as they decode).

    .venv/bin/python bench/dataset_memory.py [--hours 1 3] [--weights DIR]

A silent FLAC of each length (a few MB on disk, the worst ratio of file to decoded size) is written to
bench/work/; each way runs in a child process, which reports its peak RSS above what it held after
the imports and the model load. The model is the tiny set's musicgen-small (``script/tiny-weights``:
written to bench/work/tiny when --weights is not given): the memory measured is the audio's, which does
not depend on the model's size; a real model adds its own weights and one segment's activations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RATE = 32000

CHILD = """
import resource, sys, time
from pathlib import Path
weights_dir, path, way = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
from musicgen_service.weights import hub as weights; weights.use_hub_cache(weights_dir)
from musicgen_service.weights import loading
from musicgen_service.training import dataset, tokens
model = loading.load_musicgen(weights_dir, "facebook/musicgen-small", "cpu")
found = dataset.Collected(audio=[path])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if way == "held":  # every segment decoded and kept, then tokenized
    segments = list(dataset.segments(path.parent, found, 32000, 1, 30.0))
    features = tokens.compute(model, segments, "")
else:  # checked once, then tokenized as it decodes
    planned = dataset.plan(path.parent, found, 32000, 1, 30.0)
    features = tokens.compute(model, dataset.segments(path.parent, planned.usable, 32000, 1, 30.0), "")
print(len(features.examples), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
      time.perf_counter() - start)
"""


def silent_flac(hours: float) -> Path:
    import numpy as np
    import soundfile

    path = WORK / f"silence-{hours:g}h.flac"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        with soundfile.SoundFile(str(path), "w", RATE, 1, format="FLAC", subtype="PCM_16") as f:
            for _ in range(int(hours * 60)):
                f.write(np.zeros((60 * RATE, 1), np.int16))
    return path


def run(weights_dir: Path, path: Path, way: str) -> tp.Dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(weights_dir), str(path), way],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    segments, grown, seconds = done.stdout.split()[-3:]
    return {"segments": int(segments), "peak_growth_MB": round(float(grown)), "seconds": round(float(seconds), 1)}


def cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--weights", type=Path, help="a tiny (or real) set holding facebook/musicgen-small")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dataset-memory")
    args = parser.parse_args()
    weights_dir = args.weights
    if weights_dir is None:
        weights_dir = WORK / "tiny"
        if not (weights_dir / "models--facebook--musicgen-small").exists():
            from musicgen_service.tools import tiny

            tiny.write_tiny_set(weights_dir)
    rows = []
    for hours in args.hours:
        path = silent_flac(hours)
        row = {"hours": hours, "file_MB": round(path.stat().st_size / 1e6, 1)}
        for way in ("held", "streamed"):
            row[way] = run(weights_dir, path, way)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "what": "peak RSS growth (MB) while preparing a training dataset: segments held vs streamed",
        "machine": {"cpu": cpu(), "cores": os.cpu_count()},
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Training dataset memory ({result['date']}, {result['machine']['cpu']}, {os.cpu_count()} cores)",
        "",
        "A silent FLAC (mono, 32 kHz) prepared for training on the tiny musicgen-small: peak RSS growth above",
        "the imports and the model, and the time, with every segment held (as before) and streamed (now).",
        "",
        "| audio | file | held: peak | held: time | streamed: peak | streamed: time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hours']:g} h | {r['file_MB']} MB | +{r['held']['peak_growth_MB']} MB | "
            f"{r['held']['seconds']} s | +{r['streamed']['peak_growth_MB']} MB | {r['streamed']['seconds']} s |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
