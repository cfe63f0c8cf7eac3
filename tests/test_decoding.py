"""The decoders against stock audiocraft, on the tiny models.

Exact mode must give the very tokens stock ``LMModel.generate`` gives: greedily, and when
sampling from the same seed (both consume the random stream identically: the same sampling
functions, called with the same shapes, in the same order). Compared across text (cross-attention
conditioning), melody (prepended conditioning), continuation (a prompt) and past 30 s (audiocraft's
windowed extension calls the decoder once per window).
"""
from __future__ import annotations

import pytest
import torch

from audio_helpers import melody, write
from conftest import MONO_TEXT, STEREO_MELODY, make_service
from musicgen_service.decoding import Decoder, fast_dtype
from musicgen_service.generate import Generator


@pytest.fixture(scope="module")
def text_service(tiny_weights):
    return make_service(tiny_weights, MONO_TEXT, decoder="stock")


@pytest.fixture(scope="module")
def melody_service(tiny_weights):
    return make_service(tiny_weights, STEREO_MELODY, decoder="stock")


@pytest.fixture(scope="module")
def tune(tmp_path_factory):
    return write(tmp_path_factory.mktemp("dec") / "tune.wav", melody([262, 392, 330, 523], 0.5, 32000, 1), 32000)


def tokens(service, mode: str, **inputs) -> torch.Tensor:
    req = service.parse(**{"prompt": "lo-fi beat", "duration": 1, "seed": 5, **inputs})
    generator = Generator(service.model, mode)
    assert generator.decoder.mode == mode, generator.decoder.describe()
    return generator.generate(req, service.input_clip(req)).tokens


@pytest.mark.parametrize("sampling", [
    {"top_k": 250}, {"top_k": 1}, {"top_p": 0.8}, {"temperature": 0.5, "top_k": 20},
    {"classifier_free_guidance": 0},
])
def test_exact_equals_stock_text(text_service, sampling):
    assert torch.equal(tokens(text_service, "exact", **sampling), tokens(text_service, "stock", **sampling))


def test_exact_equals_stock_greedy(text_service):
    """use_sampling=False (argmax) through the decoder's own signature."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = text_service.model.lm
    conditions = [ConditioningAttributes(text={"description": "jazz"})]
    stock = lm.generate(None, conditions, max_gen_len=60, use_sampling=False)
    exact = Decoder(lm, "exact").generate(None, conditions, max_gen_len=60, use_sampling=False)
    assert torch.equal(stock, exact)


def test_exact_equals_stock_melody_and_continuation(melody_service, tune):
    for inputs in ({"input_audio": str(tune)}, {"input_audio": str(tune), "continuation": True},
                   {"prompt": None, "input_audio": str(tune), "continuation": True, "continuation_end": 1}):
        assert torch.equal(tokens(melody_service, "exact", **inputs), tokens(melody_service, "stock", **inputs)), inputs


def test_exact_equals_stock_past_the_window(text_service):
    exact = tokens(text_service, "exact", duration=33)
    assert exact.shape[-1] == 33 * 50
    assert torch.equal(exact, tokens(text_service, "stock", duration=33))


def test_static_steps_match_dynamic_steps(text_service):
    """The fixed-shape step a CUDA graph records computes what the dynamic step computes."""
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningAttributes

    from musicgen_service.decoding.runner import Runner

    lm = text_service.model.lm
    conditions = [ConditioningAttributes(text={"description": "jazz"})]
    conditions = conditions + ClassifierFreeGuidanceDropout(p=1.0)(conditions)
    tensors = lm.condition_provider(lm.condition_provider.tokenize(conditions))
    runner = Runner(lm)
    torch.manual_seed(0)
    seq = torch.randint(0, lm.card, (2, lm.n_q, 12))
    dyn, sta = runner.start(tensors, 2, 20), runner.start(tensors, 2, 20, static=True)
    torch.testing.assert_close(dyn.prefill(seq[..., :4]), sta.prefill(seq[..., :4]), rtol=0, atol=0)
    for t in range(4, 12):
        torch.testing.assert_close(dyn.step(seq[..., t:t + 1]), sta.step(seq[..., t:t + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(fast_dtype(torch.device("cpu")) is None, reason="no reduced precision on this CPU")
def test_fast_mode_runs_every_mode(text_service, melody_service, tune):
    for service, inputs in ((text_service, {"duration": 2}), (melody_service, {"input_audio": str(tune)}),
                            (melody_service, {"input_audio": str(tune), "continuation": True}),
                            (text_service, {"duration": 31})):
        fast = tokens(service, "fast", **inputs)
        exact = tokens(service, "exact", **inputs)
        assert fast.shape == exact.shape
        assert fast.min() >= 0 and fast.max() < service.model.lm.card


@pytest.mark.parametrize("dtype, max_kl", [(torch.float16, 1e-5), (torch.bfloat16, 1e-3)])
def test_fast_precision_stays_close_to_exact(text_service, melody_service, dtype, max_kl):
    """Teacher-forced on the same tokens, next-token distributions barely move (bench/quality.py
    measures the same at real size)."""
    from bench.quality import teacher_forced
    from musicgen_service.decoding.runner import Runner

    for service in (text_service, melody_service):
        model = service.model
        reference = tokens(service, "exact")
        q = teacher_forced(model, Runner(model.lm), Runner(model.lm, dtype), "lo-fi beat", reference)
        assert q["kl_mean"] < max_kl, q
        assert q["top1_agreement"] > 0.9, q


def test_unsupported_models_fall_back_to_stock(text_service, capsys):
    lm = text_service.model.lm
    lm.transformer.positional_embedding = "rope"
    try:
        decoder = Decoder(lm, "exact")
    finally:
        lm.transformer.positional_embedding = "sin"
    assert decoder.mode == "stock" and "positional embedding" in decoder.describe()


def test_bad_mode_is_refused(text_service):
    with pytest.raises(ValueError, match="decoding mode"):
        Decoder(text_service.model.lm, "turbo")
