"""MultiBand Diffusion: safe loading, mono and stereo models in every mode, windows, errors."""

from __future__ import annotations

import math

import pytest
import torch
from audio_helpers import melody, write
from conftest import MONO_MELODY, make_service

from musicgen_service.audio import mbd as multiband
from musicgen_service.core.errors import InputError
from musicgen_service.core.settings import Settings
from musicgen_service.serving.setup import MBDSource
from musicgen_service.weights import hub as weights
from musicgen_service.weights import loading

RATE = 32000


@pytest.fixture(scope="module")
def mono(tiny_weights):
    return make_service(tiny_weights, MONO_MELODY, mbd="eager")


@pytest.fixture(scope="module")
def tune(tmp_path_factory):
    return write(tmp_path_factory.mktemp("mbd") / "tune.wav", melody([330, 440, 550], 0.5, RATE, 2), RATE)


def test_checkpoint_needs_and_gets_only_the_omegaconf_classes(tiny_weights):
    path = weights.cached_file(tiny_weights, weights.HubFile(weights.MBD_REPO, weights.MBD_FILE))
    with pytest.raises(Exception, match="Unsupported global"):  # torch's safe loading is on
        torch.load(path, weights_only=True)
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    allowed = {
        f"{c.__module__}.{getattr(c, '__qualname__', getattr(c, '_name', ''))}"
        for c in loading.omegaconf_safe_globals()
    }
    assert needed <= allowed, needed - allowed
    with torch.serialization.safe_globals(loading.omegaconf_safe_globals()):
        pkg = torch.load(path, weights_only=True)
    assert pkg["n_bands"] == 2


def test_eager_loads_in_setup_and_lazy_on_first_use(mono, tiny_weights):
    assert mono.mbd._mbd is not None  # MUSICGEN_MBD=eager
    lazy = make_service(tiny_weights, MONO_MELODY)  # the default: lazy
    assert lazy.mbd._mbd is None
    first = lazy.mbd_decoder()
    assert first is not None and lazy.mbd_decoder() is first  # loaded once


@pytest.mark.parametrize("which", ["mono", "stereo"])
@pytest.mark.parametrize("mode", ["text", "melody", "continuation"])
def test_mbd_decodes_every_mode(which, mode, mono, service, tune):
    svc = mono if which == "mono" else service
    inputs = {"prompt": "jazz", "duration": 1, "seed": 3, "multi_band_diffusion": True}
    if mode != "text":
        inputs.update(input_audio=str(tune), continuation=mode == "continuation", continuation_end=1)
    req = svc.parse(**inputs)
    out = svc.generator.generate(req, svc.input_clip(req), svc.mbd_decoder())
    channels = 1 if which == "mono" else 2
    seconds = 2 if mode == "continuation" else 1  # continuation: 1 s of prompt + 1 s of new music
    assert out.wav.shape == (channels, seconds * RATE) and out.sample_rate == RATE
    assert torch.isfinite(out.wav).all() and out.wav.abs().max() > 0
    encodec = svc.generator.to_audio(out.tokens)[0]
    assert encodec.shape == out.wav.shape
    assert not torch.allclose(encodec, out.wav, atol=1e-3)
    if which == "stereo":  # left and right come from their own code streams
        assert not torch.allclose(out.wav[0], out.wav[1])


def test_mbd_through_predict(mono):
    from audio_helpers import decode

    data, rate = decode(mono.predict(prompt="folk", duration=1, seed=1, multi_band_diffusion=True, output_format="mp3"))
    assert rate == RATE and data.shape[0] == 1


def test_long_outputs_are_decoded_in_crossfaded_windows(mono, monkeypatch):
    monkeypatch.setattr(multiband, "WINDOW_SECONDS", 1.0)
    monkeypatch.setattr(multiband, "OVERLAP_SECONDS", 0.2)
    tokens = mono.generator.generate(mono.parse(prompt="x", duration=3, seed=1)).tokens  # 150 frames
    calls = []
    real = mono.mbd_decoder().tokens_to_wav
    monkeypatch.setattr(mono.mbd_decoder(), "tokens_to_wav", lambda codes: calls.append(codes.shape[-1]) or real(codes))
    wav = multiband.tokens_to_wav(mono.mbd_decoder(), mono.model.compression_model, tokens)
    assert wav.shape == (1, 1, 3 * RATE)
    assert calls == [50, 50, 50, 30]  # 1 s windows every 0.8 s; the last one is shorter


def test_crossfade_is_equal_power_and_continuous():
    a, b = torch.ones(1, 1, 100), -torch.ones(1, 1, 100)
    out = multiband.crossfade([a, b], overlap=20)
    assert out.shape[-1] == 180
    join = out[0, 0, 75:105]
    assert (join[1:] <= join[:-1]).all()  # a smooth ramp from a to b, no jump
    assert torch.abs(out[0, 0, 79] - 1) < 0.01 and torch.abs(out[0, 0, 100] + 1) < 0.01
    t = (torch.arange(20) + 0.5) / 20  # the fades' powers add up to one
    assert torch.allclose(torch.sin(t * math.pi / 2) ** 2 + torch.cos(t * math.pi / 2) ** 2, torch.ones(20))


@pytest.mark.parametrize("rho", [0.0, 0.4, 0.8, 1.0])
def test_crossfade_keeps_the_level_of_partly_correlated_windows(rho):
    """Two renderings sharing a part ``rho`` of their power: the join's middle keeps the level
    (a plain equal-power crossfade would swell by 10 log10(1 + rho) dB there)."""
    g = torch.Generator().manual_seed(0)
    n, overlap = 64000, 32000
    shared, a, b = (torch.randn(1, 1, n, generator=g) for _ in range(3))
    first = math.sqrt(rho) * shared + math.sqrt(1 - rho) * a
    second = math.sqrt(rho) * shared + math.sqrt(1 - rho) * b
    out = multiband.crossfade([first, second[..., n - overlap :]], overlap)
    middle = out[..., n - overlap + overlap // 4 : n - overlap // 4]
    assert 20 * math.log10(middle.pow(2).mean().sqrt().item()) == pytest.approx(0, abs=0.2)
    if rho == 1.0:  # the same signal twice: the join returns it
        torch.testing.assert_close(out[..., :n], first, rtol=0, atol=1e-5)


def test_missing_mbd_weights_are_named(tmp_path):
    reason = MBDSource(Settings(weights_dir=tmp_path), "cpu").unavailable()
    assert "facebook/multiband-diffusion/mbd_musicgen_32khz.th" in reason
    assert "script/download-weights" in reason
    with pytest.raises(weights.WeightsMissingError, match="mbd_musicgen_32khz.th"):
        MBDSource(Settings(weights_dir=tmp_path, mbd="eager"), "cpu")


def test_mbd_unavailable_is_refused_before_generation(tiny_weights, capsys):
    off = make_service(tiny_weights, MONO_MELODY, mbd="off")
    with pytest.raises(InputError, match=r"multi_band_diffusion: .*turned off on this deployment"):
        off.predict(prompt="x", multi_band_diffusion=True)
    assert "seed:" not in capsys.readouterr().out


def test_incompatible_tokens_are_refused(mono):
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    from musicgen_service.tools import tiny

    cfg = tiny.encodec_config()
    cfg["rvq"]["n_q"] = 8
    other = builders.get_compression_model(OmegaConf.create(cfg))
    with pytest.raises(InputError, match="multi_band_diffusion: this model's tokens .* 8 codebooks"):
        multiband.check_compatible(mono.mbd_decoder(), other)
    multiband.check_compatible(mono.mbd_decoder(), mono.model.compression_model)  # the real pairing is fine
