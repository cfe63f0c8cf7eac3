"""Concurrent requests sharing decoding steps (musicgen_service/serving/scheduler.py, decoding/rows.py):
a request's tokens must not depend on what it was batched with."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from audio_helpers import melody, write
from conftest import MONO_TEXT, STEREO_MELODY, make_service

from musicgen_service.core.errors import Cancelled
from musicgen_service.decoding import formats


def _runnable(name, slow=False):
    reason = formats.unavailable_reason(name, torch.device("cpu"))
    marks = [pytest.mark.skipif(reason is not None, reason=str(reason))] + ([pytest.mark.slow] if slow else [])
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(scope="module")
def tune(tmp_path_factory):
    return write(tmp_path_factory.mktemp("batch") / "tune.wav", melody([262, 392, 330, 523], 0.5, 32000, 2), 32000)


REQUESTS = [
    dict(prompt="lo-fi beat", duration=2, seed=1),
    dict(prompt="jazz trio", duration=3, seed=2, top_k=20),
    dict(prompt="metal", duration=1, seed=3, top_p=0.9),
    dict(prompt="ambient", duration=2, seed=4, temperature=0.7, classifier_free_guidance=5),
]


def _submit(service, inputs, cancel=None):
    req = service.parse(**inputs)
    prepared = service.generator.condition(req, service.input_clip(req), tensors=True)
    return service.scheduler.submit(prepared, cancel)


# fp16 (runnable on every CPU) with adaptive padding in the quick loop; the rest in `--all`
@pytest.mark.parametrize("padding", [pytest.param("fixed", marks=pytest.mark.slow), "adaptive"])
@pytest.mark.parametrize("name", [_runnable("fp16"), _runnable("bf16", slow=True), _runnable("int8", slow=True)])
def test_tokens_are_the_same_alone_and_in_any_batch(tiny_weights, tune, name, padding):
    """Text, melody and continuation rows of different lengths and sampling parameters: alone, all
    submitted at once, and joining a running batch at different steps give the same tokens. Both
    padding policies are forced: adaptive only where this CPU's kernels allow it (else skipped)."""
    service = make_service(tiny_weights, STEREO_MELODY, decoder=name, concurrency=4)
    assert service.scheduler.batching
    rows = service.scheduler.rows
    if padding == "adaptive" and not rows.invariant_across_row_counts():
        pytest.skip("this CPU's kernels give a row different bits at different row counts")
    rows.padding = padding
    requests = REQUESTS[:2] + [
        dict(prompt="synthwave", input_audio=str(tune), duration=2, seed=5),
        dict(prompt="continue", input_audio=str(tune), continuation=True, duration=1, seed=6),
    ]
    alone = [_submit(service, r).result() for r in requests]
    together = [f.result() for f in [_submit(service, r) for r in requests]]
    staggered = []
    for r in requests:  # each joins the batch a few steps after the previous one
        staggered.append(_submit(service, r))
        time.sleep(0.05)
    staggered = [f.result() for f in staggered]
    for a, b, c, r in zip(alone, together, staggered, requests):
        assert torch.equal(a, b) and torch.equal(a, c), r
    assert max(n for n in service.scheduler.batch_sizes) > 1  # they did share steps


@pytest.mark.slow
def test_exact_and_int8dyn_decode_alone(tiny_weights):
    """exact keeps its promise (stock's tokens) by decoding alone; fbgemm's dynamic int8 scales
    activations over all rows, so its rows would depend on each other: alone too."""
    for name in ("exact", "int8dyn"):
        if formats.unavailable_reason(name, torch.device("cpu")):
            continue
        service = make_service(tiny_weights, MONO_TEXT, decoder=name, concurrency=4)
        assert not service.scheduler.batching and "one request at a time" in service.scheduler.describe()
        paths = [None] * len(REQUESTS)

        def run(i):
            paths[i] = service.predict(**REQUESTS[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(p is not None and p.is_file() for p in paths)


@pytest.mark.slow
def test_long_requests_run_alone_between_batches(tiny_weights):
    """Past the window (audiocraft's extension) a request runs alone; the others still batch."""
    service = make_service(tiny_weights, MONO_TEXT, decoder="fp16", concurrency=4)
    futures = [_submit(service, dict(prompt="long", duration=31, seed=9))] + [_submit(service, r) for r in REQUESTS]
    assert futures[0].result().shape[-1] == 31 * 50
    assert [f.result().shape[-1] for f in futures[1:]] == [50 * r["duration"] for r in REQUESTS]


def test_a_cancelled_row_leaves_and_the_others_finish(tiny_weights):
    service = make_service(tiny_weights, MONO_TEXT, decoder="fp16", concurrency=4)
    cancel = threading.Event()
    doomed = _submit(service, dict(prompt="doomed", duration=20, seed=1), cancel)
    others = [_submit(service, r) for r in REQUESTS]
    time.sleep(0.2)
    cancel.set()
    with pytest.raises(Cancelled):
        doomed.result(timeout=30)
    assert [f.result().shape[-1] for f in others] == [50 * r["duration"] for r in REQUESTS]


def test_padding_policies():
    from musicgen_service.decoding.rows import RowDecoder

    rows = RowDecoder.__new__(RowDecoder)
    rows.slots = 4
    rows.padding = "fixed"
    assert [rows.padded(n) for n in (2, 4, 6, 8)] == [8, 8, 8, 8]
    rows.padding = "adaptive"
    assert [rows.padded(n) for n in (2, 4, 6, 8)] == [2, 4, 8, 8]
