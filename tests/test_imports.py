"""What setup imports (musicgen_service/core/imports.py): in a fresh process, as Cog's worker starts, setup
and a prediction leave the deferred modules unimported, and each deferred module, once used (MultiBand
Diffusion on first request, stock attention's xformers ops, spaCy, sklearn's roc_curve), is the real
one. The test session itself has imported everything already, hence the subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import asyncio, json, sys, types
sys.path.insert(0, sys.argv[1])
import predict
from musicgen_service.core import imports

deferred = ["spacy", "xformers", "sklearn", "dora", "torchmetrics", "audiocraft.solvers", "scipy.signal",
            "audiocraft.models.multibanddiffusion"]
real = lambda: sorted(m for m in deferred if m in sys.modules)
out = {}
p = predict.Predictor()
p.setup()
out["after_setup"] = real()
out["stand_ins_left"] = sorted(n for n, m in sys.modules.items() if isinstance(m, imports._StandIn))
inputs = dict(prompt="lo-fi beat", input_audio=None, duration=1, continuation=False, continuation_start=0,
              continuation_end=None, multi_band_diffusion=False, normalization_strategy="loudness", top_k=250,
              top_p=0.0, temperature=1.0, classifier_free_guidance=3, output_format="wav", seed=1)
asyncio.run(p.predict(**inputs))
out["after_prediction"] = real()
asyncio.run(p.predict(**{**inputs, "multi_band_diffusion": True}))  # MBD loads through its stand-in
out["after_mbd"] = real()
from musicgen_service.generation.generator import Generator  # stock attention: xformers' ops.unbind, imported on use
service = p.service
stock = Generator(service.model, "stock").generate(service.parse(prompt="jazz", duration=1, seed=2))
out["stock_tokens"] = list(stock.tokens.shape)
out["after_stock"] = real()
with imports.deferred_imports():
    import spacy
    from sklearn.metrics import roc_curve
    out["spacy_is_stand_in"] = isinstance(spacy, imports._StandIn)
    out["roc_curve_is_stand_in"] = isinstance(roc_curve, imports._Name)
    fpr, tpr, _ = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    out["roc_curve"] = [list(map(float, fpr)), list(map(float, tpr))]
    out["spacy_load_is_real"] = spacy.load is sys.modules["spacy"].load
out["spacy_real_after"] = type(sys.modules["spacy"]) is types.ModuleType
out["stand_ins_left_after_block"] = sorted(n for n, m in sys.modules.items() if isinstance(m, imports._StandIn))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # a whole fresh process with setup and four predictions
def test_setup_and_predictions_import_only_what_they_use(tiny_weights, tmp_path):
    env = {
        **os.environ,
        "MUSICGEN_WEIGHTS": str(tiny_weights),
        "MUSICGEN_DECODER": "exact",
        "MUSICGEN_DEVICE": "cpu",
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["after_setup"] == [] and out["stand_ins_left"] == [], out
    assert out["after_prediction"] == [], out
    assert "audiocraft.models.multibanddiffusion" in out["after_mbd"], out  # imported when first used
    assert "xformers" in out["after_stock"] and out["stock_tokens"] == [1, 8, 50], out
    assert out["spacy_is_stand_in"] and out["roc_curve_is_stand_in"] and out["spacy_load_is_real"], out
    assert out["roc_curve"] == [[0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0]], out
    assert out["spacy_real_after"] and out["stand_ins_left_after_block"] == [], out
