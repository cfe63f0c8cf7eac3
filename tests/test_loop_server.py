"""The loop model through the real Cog server (script/serve --loop: coglet with cog.loop.yaml's
predictor and its schema): a list of files, uploads and webhooks, the API's validation, cancel."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile
from server_helpers import CogServer, Peer, data_uri_bytes

pytestmark = pytest.mark.slow  # two servers

ROOT = Path(__file__).resolve().parent.parent
RATE = 32000


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    p = Peer(tmp_path_factory.mktemp("loop-peer"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def servers(tiny_weights, tmp_path_factory, peer):
    logs = tmp_path_factory.mktemp("loop-logs")
    env = {"MUSICGEN_DECODER": "int8", "MUSICGEN_PREPARED": "off"}
    main = CogServer(tiny_weights, logs / "loop.log", loop=True, env=env)
    upload = CogServer(tiny_weights, logs / "loop-upload.log", upload_url=f"{peer.url}/uploads/", loop=True, env=env)
    main.wait()
    upload.wait()
    yield {"main": main, "upload": upload}
    main.stop()
    upload.stop()


def test_the_schema_is_the_committed_loop_schema(servers):
    from server_helpers import request

    schema = request("GET", f"{servers['main'].url}/openapi.json").body
    committed = json.loads((ROOT / ".cog" / "loop" / "openapi_schema.json").read_text())
    assert schema["components"]["schemas"]["Input"] == committed["components"]["schemas"]["Input"]
    assert schema["components"]["schemas"]["Output"]["type"] == "array"


def test_a_list_of_exact_loops(servers):
    response = servers["main"].predict({"prompt": "funk drums", "bpm": 100, "bars": 1, "variations": 2, "seed": 5})
    assert response.status == 200, response.body
    body = response.body
    assert body["status"] == "succeeded", body.get("logs")
    assert len(body["output"]) == 2
    for uri in body["output"]:
        mime, data = data_uri_bytes(uri)
        wav, rate = soundfile.read(io.BytesIO(data), always_2d=True)
        assert rate == RATE and wav.shape == (round(4 * 0.6 * RATE), 2)
    assert "seed 5" in body["logs"] and "loop 1" in body["logs"]


def test_the_apis_validation_names_the_field(servers):
    response = servers["main"].predict({"prompt": "x", "bars": 3})
    assert response.status == 422, response.body
    assert "bars" in json.dumps(response.body)
    response = servers["main"].predict({"prompt": "x", "bpm": 40, "bars": 16, "beats_per_bar": 12})
    assert response.body["status"] == "failed" and "bars" in response.body["error"]


def test_uploads_by_name_and_webhooks(servers, peer):
    server = servers["upload"]
    response = server.predict(
        {"prompt": "house", "bpm": 124, "bars": 1, "variations": 3, "output_format": "mp3", "seed": 2},
        prediction_id="loop-upload-1",
        asynchronous=True,
        webhook=f"{peer.url}/hooks",
    )
    assert response.status in (200, 202), response.body
    final = peer.final_webhook("loop-upload-1", timeout=240)
    assert final["status"] == "succeeded", final.get("logs")
    # coglet uploads a list's files side by side and lists them as they finish: the names carry the index
    assert sorted(Path(u).name for u in final["output"]) == [f"loop-{i}-124bpm.mp3" for i in range(3)]
    assert all(any(name.endswith(Path(u).name) for name in peer.uploads) for u in final["output"])


def test_cancel_a_loop_prediction(servers, peer):
    server = servers["upload"]
    response = server.predict(
        {"prompt": "ambient", "bpm": 60, "bars": 8, "variations": 4, "seed": 1},
        prediction_id="loop-cancel-1",
        asynchronous=True,
        webhook=f"{peer.url}/hooks",
    )
    assert response.status in (200, 202), response.body
    peer.wait_logs("loop-cancel-1")
    assert server.cancel("loop-cancel-1").status == 200
    final = peer.final_webhook("loop-cancel-1", timeout=120)
    assert final["status"] == "canceled"
    # the server still serves
    again = servers["upload"].predict({"prompt": "x", "bpm": 150, "bars": 1, "variations": 1, "seed": 3})
    assert again.body["status"] == "succeeded", again.body
