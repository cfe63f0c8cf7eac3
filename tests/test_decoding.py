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

from musicgen_service.decoding import Decoder, formats, precision
from musicgen_service.generation.generator import Generator


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


@pytest.mark.parametrize(
    "sampling",
    [
        {"top_k": 250},
        {"top_k": 1},
        {"top_p": 0.8},
        {"temperature": 0.5, "top_k": 20},
        {"classifier_free_guidance": 0},
    ],
)
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
    for inputs in (
        {"input_audio": str(tune)},
        {"input_audio": str(tune), "continuation": True},
        {"prompt": None, "input_audio": str(tune), "continuation": True, "continuation_end": 1},
    ):
        assert torch.equal(tokens(melody_service, "exact", **inputs), tokens(melody_service, "stock", **inputs)), inputs


@pytest.fixture(scope="module")
def exact_33s(text_service):
    return tokens(text_service, "exact", duration=33)


@pytest.mark.slow
def test_exact_equals_stock_past_the_window(text_service, exact_33s):
    assert exact_33s.shape[-1] == 33 * 50
    assert torch.equal(exact_33s, tokens(text_service, "stock", duration=33))


def _cfg_tensors(lm, prompt: str = "jazz"):
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningAttributes

    conditions = [ConditioningAttributes(text={"description": prompt})]
    conditions = conditions + ClassifierFreeGuidanceDropout(p=1.0)(conditions)
    return lm.condition_provider(lm.condition_provider.tokenize(conditions))


def _steps(runner, tensors, seq, static: bool, kv_dtype=None, max_steps: int = 20):
    """Logits of a prefill over seq[..., :4] then one step per later column, dynamic or static."""
    from musicgen_service.decoding.window import StaticCaches

    caches = StaticCaches(runner, 2, kv_dtype) if static else None
    window = runner.start(tensors, 2, max_steps, caches=caches, kv_dtype=kv_dtype)
    out = [window.prefill(seq[..., :4])]
    for t in range(4, seq.shape[-1]):
        out.append(window.static_step(seq[..., t : t + 1]) if static else window.step(seq[..., t : t + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("max_steps, steps", [(20, 12), pytest.param(1503, 600, marks=pytest.mark.slow)])
def test_static_steps_match_dynamic_steps(text_service, max_steps, steps):
    """The fixed-shape step a CUDA graph records computes what the dynamic step computes, for a
    short window and for a 30 s one (an attention span of 1536 keys, mostly masked)."""
    from musicgen_service.decoding.runner import Runner

    lm = text_service.model.lm
    tensors = _cfg_tensors(lm)
    runner = Runner(lm)
    torch.manual_seed(0)
    seq = torch.randint(0, lm.card, (2, lm.n_q, steps))
    dyn = _steps(runner, tensors, seq, False, max_steps=max_steps)
    sta = _steps(runner, tensors, seq, True, max_steps=max_steps)
    torch.testing.assert_close(dyn[0], sta[0], rtol=0, atol=0)  # the prefill is the same code
    torch.testing.assert_close(dyn, sta, rtol=1e-5, atol=1e-5)


def _gpu_like(lm, dtype):
    """The LM laid out as audiocraft builds it on GPUs: transformer layers in the reduced dtype,
    embeddings, output norm and heads in fp32 (stock relies on autocast to reconcile them)."""
    import copy

    lm = copy.deepcopy(lm)
    lm.transformer.to(dtype)
    return lm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_runner_has_explicit_dtypes(text_service, dtype):
    """The GPU configuration on the CPU: reduced-precision layers and caches, the static step
    against the dynamic one, with autocast on and off: the same logits either way, no dtype error
    (stock's layout fails outside autocast: 'expected scalar type Float but found Half')."""
    from musicgen_service.decoding.runner import Runner

    lm = _gpu_like(text_service.model.lm, dtype)
    runner = Runner(lm, {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
    tensors = _cfg_tensors(lm)
    torch.manual_seed(0)
    seq = torch.randint(0, lm.card, (2, lm.n_q, 10))
    results = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for static in (False, True):
                results[autocast, static] = _steps(runner, tensors, seq, static, kv_dtype=dtype)
    for static in (False, True):
        assert torch.equal(results[False, static], results[True, static])
    assert results[False, False].dtype == torch.float32
    torch.testing.assert_close(results[False, False], results[False, True], rtol=0.02, atol=0.02)


def _seeded(fn, seed):
    torch.manual_seed(seed)
    out = fn()
    return out, torch.rand(4)  # the random stream's state afterwards


@pytest.mark.parametrize(
    "params",
    [
        dict(use_sampling=True, temp=1.0, top_k=250, top_p=0.0),
        dict(use_sampling=True, temp=0.7, top_k=20, top_p=0.0),
        dict(use_sampling=True, temp=1.0, top_k=0, top_p=0.9),
        dict(use_sampling=True, temp=1.3, top_k=250, top_p=0.5),
        dict(use_sampling=True, temp=1.0, top_k=0, top_p=0.0),
        dict(use_sampling=True, temp=1.0, top_k=2048, top_p=0.0),
        dict(use_sampling=True, temp=1.0, top_k=1, top_p=0.0),
        dict(use_sampling=False, temp=1.0, top_k=250, top_p=0.0),
    ],
)
def test_step_sampler_gives_audiocraft_tokens(params):
    """The graph-safe sampler (parameters in tensors, one sort, multinomial as argmax(p / Exp(1)))
    against audiocraft's sampling functions: the same tokens for the same seed, and the random
    stream left where audiocraft leaves it (greedy draws once more: its tokens need no randomness)."""
    from musicgen_service.decoding.loop import sample
    from musicgen_service.decoding.sampling import StepSampler

    sampler = StepSampler(torch.device("cpu"), 2048)
    sampler.set(cfg_coef=3.0, **params)
    gen = torch.Generator().manual_seed(0)
    for seed in range(10):
        logits = torch.randn(2, 4, 2048, generator=gen) * (1 + seed)
        ours, after_ours = _seeded(lambda: sampler(logits), seed)
        theirs, after_theirs = _seeded(lambda: sample(logits.clone(), **params), seed)
        assert torch.equal(ours, theirs), (params, seed)
        assert params["use_sampling"] is False or torch.equal(after_ours, after_theirs)
    all_logits = torch.randn(4, 4, 2048, generator=gen)
    cond, uncond = all_logits.split(2)
    assert torch.equal(sampler.guide(all_logits, 2), uncond + (cond - uncond) * 3.0)


def _static_decoder(lm):
    decoder = Decoder(lm, "exact", static_steps=True)
    assert decoder.describe() == "exact, static steps"
    return decoder


def _tokens_with(service, decoder, **inputs):
    generator = Generator(service.model, "stock")
    generator.decoder = decoder
    req = service.parse(**{"prompt": "lo-fi beat", "duration": 1, "seed": 5, **inputs})
    return generator.generate(req, service.input_clip(req)).tokens


@pytest.mark.slow  # ~11 s: the CUDA-graph step run eagerly on CPU; in `--all`
def test_static_loop_gives_the_exact_tokens(text_service, melody_service, tune):
    """The whole static step (layers, guidance, sampling, token write: what a CUDA graph replays),
    run eagerly on the exact weights, against the exact decoder's dynamic steps, same seed: text
    (cross-attention), melody (prepended chroma), continuation (a prompt). Within one short span the
    masked attention adds only exact zeros, so the tokens are the same; one decoder serves every window
    (its caches are reused and cleared), and the same request twice gives the same tokens."""
    for service, inputs in (
        (text_service, {"duration": 2}),
        (melody_service, {"input_audio": str(tune)}),
        (melody_service, {"input_audio": str(tune), "continuation": True, "top_p": 0.9}),
        (text_service, {"duration": 2, "temperature": 0.7, "top_k": 20}),
    ):
        decoder = _static_decoder(service.model.lm)
        static = _tokens_with(service, decoder, **inputs)
        assert torch.equal(static, tokens(service, "exact", **inputs)), inputs
        assert torch.equal(static, _tokens_with(service, decoder, **inputs)), inputs
        assert decoder.graphs.eager_steps > 0 and decoder.graphs.failures == 0


@pytest.mark.slow
def test_static_loop_past_the_window(text_service, exact_33s):
    """Two extension windows through the static loop: the caches grow to a 30 s span, and the
    second window starts from the first one's prompt. Over a long span, masked attention is not
    bitwise the dynamic one (test_static_steps_match_dynamic_steps bounds the difference at 1e-5),
    and once one sampled token differs, the rest of the free-running sequence does too: so the
    output is checked for its shape, its range and the first window's opening."""
    static = _tokens_with(text_service, _static_decoder(text_service.model.lm), duration=33)
    exact = exact_33s
    assert static.shape == exact.shape == (1, 4, 33 * 50)
    assert static.min() >= 0 and static.max() < text_service.model.lm.card
    assert torch.equal(static[..., :50], exact[..., :50])


def _runnable(name, max_kl, slow=False):
    """Skipped only where torch cannot run that precision on this CPU at all."""
    reason = formats.unavailable_reason(name, torch.device("cpu"))
    marks = [pytest.mark.skipif(reason is not None, reason=str(reason))] + ([pytest.mark.slow] if slow else [])
    return pytest.param(name, max_kl, marks=marks, id=name)


@pytest.mark.parametrize(
    "name, max_kl", [_runnable("fp16", 1e-5), _runnable("bf16", 1e-3, slow=True), _runnable("int8", 1e-3)]
)
def test_each_precision_decodes_and_stays_close_to_exact(text_service, melody_service, tune, name, max_kl):
    """Every precision, forced whatever this CPU would pick: it decodes text, melody and continuation,
    and teacher-forced on the same tokens its next-token distributions barely move from exact's
    (bench/precision.py measures the same at real size)."""
    from bench.quality import teacher_forced
    from musicgen_service.decoding.runner import Runner

    for service, inputs in (
        (text_service, {"duration": 2}),
        (melody_service, {"input_audio": str(tune)}),
        (melody_service, {"input_audio": str(tune), "continuation": True}),
    ):
        out = tokens(service, name, **inputs)
        assert out.shape == tokens(service, "exact", **inputs).shape
        assert out.min() >= 0 and out.max() < service.model.lm.card
    for service in (text_service, melody_service):
        model = service.model
        q = teacher_forced(model, Runner(model.lm), Runner(model.lm, name), "lo-fi beat", tokens(service, "exact"))
        assert q["kl_mean"] < max_kl, q
        assert q["top1_agreement"] > 0.9, q


def test_auto_measures_and_picks_within_the_bar(text_service):
    """auto times every runnable precision here and checks the quality of the fastest: whatever it
    picks (this depends on the CPU, so no particular choice is expected) is exact, or faster than
    exact in its own measurement and within the quality bar."""
    decoder = Decoder(text_service.model.lm, "auto")
    trials = {t.precision: t for t in decoder.trials}
    assert set(trials) == set(formats.PRECISIONS)
    assert trials["exact"].ms_per_layer_step > 0
    chosen = trials[decoder.mode]
    assert decoder.describe().startswith(f"auto: {decoder.mode} (measured at ")
    if decoder.mode != "exact":
        assert chosen.ms_per_layer_step < trials["exact"].ms_per_layer_step
        assert precision.meets_bar(chosen.quality), chosen
    assert precision.decide(decoder.trials) == decoder.mode


def test_decide_never_picks_a_failing_or_slower_candidate():
    T = precision.Trial
    good = {"kl_mean": 1e-5, "top1": 1.0}
    bad = {"kl_mean": 1e-2, "top1": 0.9}
    assert precision.decide([T("exact", 10), T("int8", 3, bad), T("fp16", 5, good), T("bf16", 4)]) == "fp16"
    assert precision.decide([T("exact", 10), T("int8", 3, bad), T("fp16", 12, good)]) == "exact"
    assert precision.decide([T("exact", 10), T("fp16", None, note="unavailable")]) == "exact"
    assert precision.decide([T("exact", 10), T("fp16", 3, {"kl_mean": 1e-5, "top1": 0.97})]) == "exact"


def test_release_keeps_only_the_chosen_precision(tiny_weights):
    """Once a reduced precision is chosen, the LM's own fp32 matrices are freed, and decoding still
    works from the runner's copies."""
    service = make_service(tiny_weights, MONO_TEXT, decoder="fp16")
    lm = service.model.lm
    assert service.generator.decoder.released
    assert all(
        p.numel() == 0
        for p in (
            lm.transformer.layers[0].linear1.weight,
            lm.linears[0].weight,
            lm.transformer.layers[0].self_attn.in_proj_weight,
        )
    )
    assert lm.emb[0].weight.numel() > 0  # embeddings and norms stay: the runner reads them
    req = service.parse(prompt="lo-fi beat", duration=1, seed=1)
    assert service.generator.generate(req).tokens.shape == (1, 4, 50)


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


def test_auto_for_concurrent_requests_times_their_rows_and_keeps_rows_independent(text_service):
    """A server taking 4 concurrent requests: auto times 8 rows, and only precisions whose rows do
    not depend on each other (so batched requests keep their own tokens) are candidates."""
    decoder = Decoder(text_service.model.lm, "auto", rows=8)
    assert {t.precision for t in decoder.trials} == set(formats.BATCH_INVARIANT)
    assert decoder.mode in formats.BATCH_INVARIANT
    assert "measured at 8 rows" in decoder.describe()


def test_setup_skips_int8dyn_where_torch_lacks_dynamic_quantization(tiny_weights, monkeypatch, capsys):
    """torch marks torch.ao.quantization deprecated (torchao replaces it): with the dynamic-quantization
    module and fbgemm's dynamic ops gone, setup with auto still succeeds, logs why int8dyn is out,
    and a named int8dyn falls back to exact."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch.ao.nn.quantized.dynamic", None)  # `import` of it now fails
    monkeypatch.setattr(torch.ops, "quantized", types.SimpleNamespace())
    assert (
        formats.unavailable_reason("int8dyn", torch.device("cpu"))
        == f"this torch ({torch.__version__}) has no torch.ops.quantized.linear_prepack, "
        "torch.ops.quantized.linear_dynamic"
    )
    service = make_service(tiny_weights, MONO_TEXT, decoder="auto", prepared_off=True)  # measured here
    assert service.generator.decoder.mode != "int8dyn"
    assert "int8dyn: - (unavailable: this torch" in capsys.readouterr().out
    assert service.predict(prompt="lo-fi beat", duration=1, seed=1).is_file()
    named = Decoder(make_service(tiny_weights, MONO_TEXT, decoder="stock").model.lm, "int8dyn")
    assert named.mode == "exact" and "int8dyn unavailable here" in named.describe()


@pytest.mark.parametrize("mode", ["stock", "exact", "fp16", "static"])
def test_sampling_extremes_decode_on_every_decoder(text_service, mode):
    """A temperature of 1e-40 (logits / temperature overflowed to inf, then NaN: a raw RuntimeError in
    torch.multinomial, garbage from the static sampler's argmax) is greedy decoding, and the largest
    guidance allowed stays finite, on every decoder: stock, exact, a reduced precision, the static
    (CUDA-graph) step run eagerly."""
    for inputs in ({"temperature": 1e-40}, {"classifier_free_guidance": 1000, "temperature": 0.05}):
        if mode == "static":
            got = _tokens_with(text_service, _static_decoder(text_service.model.lm), **inputs)
            want = tokens(text_service, "exact", **inputs)
            assert torch.equal(got, want), inputs
        else:
            got = tokens(text_service, mode, **inputs)
        assert (got >= 0).all() and (got < 2048).all()
    greedy = tokens(text_service, "exact", temperature=1e-40)
    assert torch.equal(greedy, tokens(text_service, "exact", temperature=1e-40, seed=6))  # no randomness left
