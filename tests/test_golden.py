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
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


# Runs a recorder (ours, or the baseline commit's) and notes, for each ``auto`` case, the precision
# auto measured and chose in that run, from the service the recorder used for it (each case calls
# tokens_of once, in CASES' order). auto times the candidates on this machine, so on a loaded
# machine two runs can choose differently: such a case is not comparable (its explicit-precision
# twins are: every precision has cases of its own).
DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[3]) / "tests" / "golden"))
import record as recorder
chosen = []
plain = recorder.tokens_of
def tokens_of(service, request):
    chosen.append(service.generator.decoder.mode)
    return plain(service, request)
recorder.tokens_of = tokens_of
cases = recorder.record(Path(sys.argv[1]))
for (name, _model, decoder, _inputs), mode in zip(recorder.CASES, chosen):
    if decoder == "auto":
        cases[name]["chose"] = mode
Path(sys.argv[2]).write_text(json.dumps({"machine": recorder.machine(), "cases": cases}, indent=1, sort_keys=True))
"""


def record(code_root: Path, weights_dir: Path, out: Path) -> tp.Dict[str, tp.Any]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "MUSICGEN_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(weights_dir), str(out), str(code_root)],
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


@pytest.mark.slow  # a minute (two on a machine without a record: the baseline is recomputed)
def test_outputs_and_tokens_are_the_baselines(tiny_weights, tmp_path):
    now = record(ROOT, tiny_weights, tmp_path / "now.json")
    ours, expected = now["cases"], expected_for(now["machine"], tiny_weights, tmp_path)
    assert set(ours) == set(expected), (sorted(ours), sorted(expected))

    def bits(case: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
        return {k: v for k, v in case.items() if k != "chose"}

    # auto cases whose runs chose different precisions (records without "chose" are compared)
    apart = [n for n in expected if expected[n].get("chose", ours[n].get("chose")) != ours[n].get("chose")]
    differ = [n for n in expected if n not in apart and bits(ours[n]) != bits(expected[n])]
    assert not differ, "\n".join(f"{n}: now {ours[n]}\n   was {expected[n]}" for n in differ)
    for name in apart:  # (a measurement's outcome, not the code's: see DRIVER)
        warnings.warn(f"{name}: auto chose {ours[name]['chose']} now, {expected[name]['chose']} then", stacklevel=1)
