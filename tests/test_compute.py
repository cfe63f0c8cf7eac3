"""The compute thread (musicgen_service/serving/compute.py): all of a prediction's torch work runs in it,
and what it logs for a request is logged by that request's thread."""

from __future__ import annotations

import threading

import pytest
from conftest import MONO_TEXT, make_service

from musicgen_service.core.logs import get_logger
from musicgen_service.serving import compute


def test_tasks_run_in_the_one_thread_and_their_lines_go_to_the_caller():
    thread = compute.shared()
    assert compute.shared() is thread
    lines = []

    def task():
        get_logger().info("from the task")
        return threading.current_thread()

    assert thread.post(task, say=lines.append).result(timeout=10) is thread.thread
    assert lines == ["from the task"]
    with pytest.raises(ValueError, match="bad"):
        thread.call(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert thread.call(lambda: thread.call(threading.current_thread)) is thread.thread  # re-entrant


@pytest.mark.parametrize("decoder", ["fp16", "exact"])  # batched, and one request at a time
def test_a_prediction_runs_torch_in_the_compute_thread_only(tiny_weights, decoder):
    """Forward hooks on the conditioners (T5) and EnCodec record the thread each ran in: setup's and
    the prediction's, from a thread of its own as Cog runs it, are all the compute thread."""
    seen = set()

    def hook(*_):
        seen.add(threading.current_thread().name)

    service = make_service(tiny_weights, MONO_TEXT, decoder=decoder, concurrency=2)
    model = service.model
    for module in (model.lm.condition_provider, model.compression_model.decoder):
        module.register_forward_pre_hook(hook)
    box = []
    worker = threading.Thread(target=lambda: box.append(service.predict(prompt="x", duration=1, seed=3)))
    worker.start()
    worker.join()
    assert box and box[0].is_file()
    assert seen == {compute.shared().thread.name}
