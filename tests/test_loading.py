"""Fast setup: models built without throw-away initialisation from mapped checkpoints must equal
what stock audiocraft loads, parameter for parameter and token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import MONO_TEXT, STEREO_MELODY

from musicgen_service.weights import hub as weights
from musicgen_service.weights import loading


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("model_id", [STEREO_MELODY, MONO_TEXT])
def test_fast_loading_equals_stock(tiny_weights, model_id, capsys):
    from audiocraft.models import MusicGen

    fast = loading.load_musicgen(tiny_weights, model_id, "cpu")
    stock = MusicGen.get_pretrained(str(weights.musicgen_folder(tiny_weights, model_id)), device="cpu")
    _same_state(fast.lm, stock.lm)
    _same_state(fast.compression_model, stock.compression_model)
    # the conditioners' own models (not in the LM's state dict)
    t5_fast = fast.lm.condition_provider.conditioners["description"].t5
    t5_stock = stock.lm.condition_provider.conditioners["description"].t5
    _same_state(t5_fast, t5_stock)
    if "self_wav" in stock.lm.condition_provider.conditioners:
        _same_state(
            fast.lm.condition_provider.conditioners["self_wav"].demucs,
            stock.lm.condition_provider.conditioners["self_wav"].demucs,
        )
        for m in (fast, stock):
            assert m.lm.condition_provider.conditioners["self_wav"].match_len_on_eval is True
    assert (fast.sample_rate, fast.audio_channels, fast.max_duration) == (
        stock.sample_rate,
        stock.audio_channels,
        stock.max_duration,
    )

    def tokens(model):
        model.set_generation_params(duration=1.0, top_k=250)
        torch.manual_seed(3)
        return model.generate(["lo-fi beat"], return_tokens=True)[1]

    assert torch.equal(tokens(fast), tokens(stock))
    out = capsys.readouterr().out
    assert "loaded the LM" in out and "build" in out and "load weights" in out and "loaded EnCodec" in out


def test_fast_mbd_equals_stock(tiny_weights):
    from audiocraft.models import MultiBandDiffusion

    fast = loading.load_mbd(tiny_weights, "cpu")
    with torch.serialization.safe_globals(loading.omegaconf_safe_globals()):
        stock = MultiBandDiffusion.get_mbd_musicgen(device="cpu")
    assert len(fast.DPs) == len(stock.DPs) == 2
    for a, b in zip(fast.DPs, stock.DPs):
        _same_state(a.model, b.model)
    _same_state(fast.codec_model, stock.codec_model)


def test_fast_build_skips_initialisation_even_across_transformers_loading(tiny_weights):
    """transformers' own no_init_weights (entered by from_pretrained inside audiocraft's builder)
    must not switch initialisation back on for the modules built after it."""
    from torch.utils.serialization import config
    from transformers import T5EncoderModel

    before = torch.nn.init.normal_
    with loading.fast_build():
        assert torch.nn.init.normal_ is not before and config.load.mmap is True
        T5EncoderModel.from_pretrained("t5-base")  # enters and leaves no_init_weights
        assert torch.nn.init.kaiming_uniform_ is loading._skip
        torch.manual_seed(0)
        calls = []
        original = torch.Tensor.uniform_
        torch.Tensor.uniform_ = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
        try:
            torch.nn.Linear(8, 8)
        finally:
            torch.Tensor.uniform_ = original
        assert calls == []  # no random numbers drawn for a module about to be loaded
    assert torch.nn.init.normal_ is before and config.load.mmap is False
    from transformers import modeling_utils

    assert modeling_utils.TORCH_INIT_FUNCTIONS["normal_"] is before
    assert torch.nn.Linear(4, 4).weight.abs().sum() > 0  # real initialisation is back
