"""Golden outputs: a fixed set of requests on the tiny set (text, melody, continuation, past the window,
MBD, every decoder, a LoRA, two requests sharing steps) gives the very bytes and tokens it gave before
the code was reshaped (tests/golden/record.py records them).

The bits depend on the CPU and torch (kernels round differently), so ``tests/golden/expected.json``
holds one record per machine kind. On a machine without a record, the baseline is recomputed here: the
baseline commit is exported from git and *its* recorder runs on *its* code, on the same tiny set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def record(code_root: Path, weights_dir: Path, out: Path) -> tp.Dict[str, tp.Any]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "MUSICGEN_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, str(code_root / "tests" / "golden" / "record.py"), str(weights_dir), str(out)],
        cwd=code_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def expected_for(machine: tp.Dict[str, tp.Any], weights_dir: Path, tmp: Path) -> tp.Dict[str, tp.Any]:
    golden = json.loads((GOLDEN / "expected.json").read_text())
    for rec in golden["records"]:
        if rec["machine"] == machine:
            return rec["cases"]
    # another machine kind: the baseline commit's own recorder on its own code
    baseline = golden["baseline"]
    export = tmp / "baseline"
    export.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", baseline], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(
            f"no golden record for this machine ({machine}) and the baseline commit {baseline} is "
            f"not in this clone's history: {archive.stderr.decode()[:200]}"
        )
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive.stdout, check=True)
    return record(export, weights_dir, tmp / "baseline.json")["cases"]


def test_outputs_and_tokens_are_the_baselines(tiny_weights, tmp_path):
    ours = record(ROOT, tiny_weights, tmp_path / "now.json")
    expected = expected_for(ours["machine"], tiny_weights, tmp_path)
    differ = [name for name in expected if ours["cases"].get(name) != expected[name]]
    assert set(ours["cases"]) == set(expected), (sorted(ours["cases"]), sorted(expected))
    assert not differ, "\n".join(f"{n}: now {ours['cases'][n]}\n   was {expected[n]}" for n in differ)
