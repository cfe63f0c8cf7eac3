"""The streaming model through the real Cog server (script/serve --stream: coglet with cog.stream.yaml's
predictor and its schema): SSE while the prediction runs, output webhooks per chunk, uploads named by
index, cancel mid-stream, melody and continuation, past the window."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from audio_helpers import decode, melody, write
from server_helpers import CogServer, Peer, data_uri_bytes, request
from test_streaming import snr_after_gain

pytestmark = pytest.mark.slow  # two servers and a dozen streamed predictions

RATE = 32000


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream-peer")
    write(folder / "tune.wav", melody([262, 392, 330, 523], 0.75, 44100, 2), 44100)
    p = Peer(folder)
    yield p
    p.close()


@pytest.fixture(scope="module")
def servers(tiny_weights, tmp_path_factory, peer):
    logs = tmp_path_factory.mktemp("stream-logs")
    main = CogServer(tiny_weights, logs / "stream.log", stream=True)
    upload = CogServer(tiny_weights, logs / "stream-upload.log", upload_url=f"{peer.url}/uploads/", stream=True)
    main.wait()
    upload.wait()
    yield {"main": main, "upload": upload}
    main.stop()
    upload.stop()


def sse(server: CogServer, inputs: dict, timeout: float = 300):
    """POST with Accept: text/event-stream; yields (seconds since the request, event, data)."""
    req = urllib.request.Request(
        f"{server.url}/predictions",
        data=json.dumps({"input": inputs}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield time.perf_counter() - start, event, json.loads(line[6:])


def audio(uri: str, tmp: Path, name: str) -> np.ndarray:
    mime, data = data_uri_bytes(uri)
    path = tmp / name
    path.write_bytes(data)
    return decode(path)[0]


def test_schema_streams_and_keeps_the_14_inputs(servers):
    schema = request("GET", f"{servers['main'].url}/openapi.json").body
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert schema["components"]["schemas"]["Output"]["x-cog-array-type"] == "iterator"
    main = json.loads((Path(__file__).resolve().parent.parent / ".cog" / "openapi_schema.json").read_text())
    assert schema["components"]["schemas"]["Input"] == main["components"]["schemas"]["Input"]


def test_sse_chunks_arrive_while_the_prediction_runs(servers, tmp_path):
    events = list(sse(servers["main"], {"prompt": "lo-fi beat", "duration": 20, "seed": 3}))
    outputs = [(t, d) for t, e, d in events if e == "output"]
    done = next(t for t, e, d in events if e == "completed")
    assert outputs and outputs[0][0] < 0.5 * done, (outputs[0][0], done)
    chunks = [audio(d["chunk"], tmp_path, f"{i}.wav") for i, (_, d) in enumerate(outputs[:-1])]
    final = audio(outputs[-1][1]["chunk"], tmp_path, "final.wav")
    joined = np.concatenate(chunks, axis=-1)
    assert joined.shape == final.shape == (2, 20 * RATE)
    assert snr_after_gain(final, joined) >= 60
    assert [d.get("index", i) for i, (_, d) in enumerate(outputs)] == list(range(len(outputs)))


def test_output_webhooks_and_uploads_named_by_index(servers, peer):
    server = servers["upload"]
    response = server.predict(
        {"prompt": "jazz", "duration": 6, "seed": 2},
        prediction_id="stream-up-1",
        asynchronous=True,
        webhook=f"{peer.url}/hook",
    )
    assert response.status == 202
    final = peer.final_webhook("stream-up-1", timeout=300)
    assert final["status"] == "succeeded"
    urls = final["output"]
    names = [u.rsplit("/", 1)[-1] for u in urls]
    chunks = sorted(n for n in names if n.startswith("chunk-"))
    assert chunks == [f"chunk-{i:04d}.wav" for i in range(len(chunks))] and len(names) == len(chunks) + 1
    with peer.lock:
        outputs = [w["output"] for w in peer.webhooks if w.get("id") == "stream-up-1" and w.get("output")]
        uploads = {k.rsplit("/", 1)[-1] for k in peer.uploads}
    assert len(outputs) >= 2 and max(len(o) for o in outputs) == len(names)  # a webhook per chunk, growing
    assert set(chunks) <= uploads


def test_cancel_mid_stream_keeps_the_chunks_sent(servers, peer, tmp_path):
    server = servers["main"]
    response = server.predict(
        {"prompt": "ambient", "duration": 120, "seed": 1},
        prediction_id="stream-cancel-1",
        asynchronous=True,
        webhook=f"{peer.url}/hook",
    )
    assert response.status == 202
    deadline = time.time() + 120
    sent = []
    while time.time() < deadline and not sent:
        with peer.lock:
            sent = [w["output"] for w in peer.webhooks if w.get("id") == "stream-cancel-1" and w.get("output")]
        time.sleep(0.1)
    assert sent, "no chunk before the cancel"
    assert server.cancel("stream-cancel-1").status == 200
    final = peer.final_webhook("stream-cancel-1", timeout=60)
    assert final["status"] == "canceled"
    for i, uri in enumerate(final.get("output") or sent[-1]):
        assert audio(uri, tmp_path, f"c{i}.wav").shape[0] == 2  # every chunk sent is a whole file
    # the server takes the next prediction
    assert server.predict({"prompt": "x", "duration": 1, "seed": 1}, retry_busy=30).body["status"] == "succeeded"


@pytest.mark.parametrize(
    "inputs, seconds",
    [
        ({"input_audio": "{peer}/tune.wav", "duration": 3}, 3),
        ({"input_audio": "{peer}/tune.wav", "continuation": True, "duration": 2}, 5),
        ({"duration": 40}, 40),
    ],
)
def test_melody_continuation_and_past_the_window(servers, peer, tmp_path, inputs, seconds):
    inputs = {k: (v.format(peer=peer.url) if isinstance(v, str) else v) for k, v in inputs.items()}
    events = [(e, d) for _, e, d in sse(servers["main"], {"prompt": "synth", "seed": 6, **inputs})]
    outputs = [d["chunk"] for e, d in events if e == "output"]
    assert any(e == "completed" for e, _ in events), events[-3:]
    chunks = np.concatenate([audio(u, tmp_path, f"{i}.wav") for i, u in enumerate(outputs[:-1])], axis=-1)
    final = audio(outputs[-1], tmp_path, "final.wav")
    assert final.shape == chunks.shape == (2, seconds * RATE)
    assert snr_after_gain(final, chunks) >= 60
