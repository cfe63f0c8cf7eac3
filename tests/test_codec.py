"""Chunked EnCodec decoding and encoding (musicgen_service.audio.codec): the one-shot results, in
bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musicgen_service.audio import codec
from musicgen_service.tools import tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mono():
    """A small EnCodec of the real layout: 32 kHz, hop 640, SEANet with a 2-layer LSTM."""
    return tiny.build_encodec(tiny.encodec_config(dimension=16, n_filters=4, lstm=2))


def models(mono):
    from audiocraft.models.encodec import InterleaveStereoCompressionModel

    return {"mono": mono, "stereo": InterleaveStereoCompressionModel(mono)}


def random_codes(model, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cardinality, (1, model.num_codebooks, frames), generator=g)


@pytest.mark.parametrize("which", ["mono", "stereo"])
@pytest.mark.parametrize("chunk", [3, 37, 1000])
def test_chunked_decode_is_the_one_shot_decode(mono, which, chunk):
    model = models(mono)[which]
    codes = random_codes(model, 120)
    with torch.inference_mode():
        one_shot = model.decode(codes, None)
        chunked = codec.decode(model, codes, chunk_frames=chunk)
    assert chunked.shape == one_shot.shape == (1, 2 if which == "stereo" else 1, 120 * 640)
    assert chunked.dtype == torch.float32 and chunked.device.type == "cpu"
    # float rounding only: kernels block other shapes differently
    assert (chunked - one_shot).abs().max() <= 1e-5 * one_shot.abs().max()


def test_margins_below_the_receptive_field_leave_seams(mono, monkeypatch):
    """What the exactness test above would catch: without context margins, every chunk's edges
    are computed against zero padding instead of the neighbouring frames."""
    codes = random_codes(mono, 120)
    bound = codec.receptive_frames
    monkeypatch.setattr(codec, "receptive_frames", lambda layers, unit: (0, bound(layers, unit)[1]))
    with torch.inference_mode():
        one_shot = mono.decode(codes, None)
        seamed = codec.decode(mono, codes, chunk_frames=37)
    assert (seamed - one_shot).abs().max() > 1e-2 * one_shot.abs().max()


@pytest.mark.parametrize("which", ["mono", "stereo"])
def test_chunked_encode_gives_the_one_shot_codes(mono, which):
    model = models(mono)[which]
    wav = 0.1 * torch.randn(1, model.channels, 120 * 640 - 123, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        one_shot = model.encode(wav)[0]
        for chunk in (3, 37):
            assert torch.equal(codec.encode(model, wav, chunk_frames=chunk), one_shot)


def test_receptive_field_bound_of_the_real_decoder():
    """MusicGen's EnCodec decoder: the bound the margins use, in 50 Hz frames, for the convolution
    before the LSTM and the upsampling stack after it (bench/long.py measures 3 as the smallest
    exact margin for both)."""
    from bench import models as bench_models

    decoder = tiny.build_encodec(bench_models.REAL_ENCODEC).decoder.model
    assert codec.receptive_frames(decoder[:1], 1) == (7, 1)
    assert codec.receptive_frames(decoder[2:], 1) == (5, 640)


MEMORY_PROBE = """
import json, sys, torch
from bench.coldstart import status_mb
from musicgen_service.audio import codec
from musicgen_service.tools import tiny

model = tiny.build_encodec()  # the tiny set's EnCodec
result = {}
with torch.inference_mode():
    for name, seconds, decode in (("chunked", 300, codec.decode),
                                  ("one_shot", 60, lambda m, c: m.decode(c, None))):
        codes = torch.randint(0, 2048, (1, 4, seconds * 50))
        decode(model, codes[..., :50])  # warm-up
        before = status_mb("VmRSS")
        wav = decode(model, codes)
        result[name] = {"above_mb": status_mb("VmHWM") - before, "output_mb": wav.numel() * 4 / 2**20}
        del wav
print(json.dumps(result))
"""


@pytest.mark.slow
def test_300_s_decode_stays_under_a_ceiling_that_one_shot_breaks_at_60_s():
    """Peak resident memory above the start of the call, on the tiny set's EnCodec (a fresh
    process: VmHWM only grows). Ceiling: the output buffer plus 100 MB. The one-shot decode needs
    more than that for a fifth of the audio (measured: ~300 MB at 60 s, ~5 MB per second)."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    chunked, one_shot = result["chunked"], result["one_shot"]
    assert chunked["output_mb"] == pytest.approx(300 * 32000 * 4 / 2**20)
    ceiling = chunked["output_mb"] + 100
    assert chunked["above_mb"] < ceiling, result
    assert one_shot["above_mb"] > ceiling, result
