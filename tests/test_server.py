"""The real Cog HTTP server (coglet, started by script/serve) on loopback, with the tiny weights.

Three servers run in this module: the main one (outputs as data: URIs), one started with
--upload-url, and one with no weights at all (setup must fail, readably).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from audio_helpers import decode, melody, write
from seed_schema import SEED_DESCRIPTIONS, SEED_INPUTS
from server_helpers import ROOT, CogServer, Peer, data_uri_bytes, request

RATE = 32000


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peer")
    write(folder / "intro.ogg", melody([330, 392, 494], 0.5, 44100, 2), 44100)
    p = Peer(folder)
    yield p
    p.close()


@pytest.fixture(scope="module")
def servers(tiny_weights, tmp_path_factory, peer):
    """Start all three servers at once: their start-ups overlap."""
    logs = tmp_path_factory.mktemp("server-logs")
    tmp = tmp_path_factory.mktemp("server-tmp")
    # fp16: a precision whose rows batch (auto's choice depends on the CPU; see test_concurrent_*)
    main = CogServer(tiny_weights, logs / "main.log", env={"TMPDIR": str(tmp), "MUSICGEN_DECODER": "fp16"})
    upload = CogServer(tiny_weights, logs / "upload.log", upload_url=f"{peer.url}/uploads/")
    empty = tmp_path_factory.mktemp("no-weights")
    broken = CogServer(empty, logs / "broken.log")
    main.tmp = tmp
    seen = main.wait()
    main.statuses = seen
    try:
        yield {"main": main, "upload": upload, "broken": broken}
    finally:
        for server in (main, upload, broken):
            server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


def audio_of(response) -> tuple:
    assert response.status == 200, response.body
    assert response.body["status"] == "succeeded", response.body
    mime, data = data_uri_bytes(response.body["output"])
    suffix = {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3"}[mime]
    path = Path(f"/tmp/server-test-{time.monotonic_ns()}{suffix}")
    path.write_bytes(data)
    try:
        return decode(path)
    finally:
        path.unlink()


def test_health_goes_from_starting_to_ready(server):
    assert server.statuses[-2:] == ["STARTING", "READY"]
    setup = server.health()["setup"]
    assert setup["status"] == "succeeded"
    # coglet keeps the head and tail of long setup logs, and may stop reading just as setup
    # returns: look for the model's name, which the last lines of setup carry
    assert "musicgen-stereo-melody-large" in setup["logs"]


def test_openapi_lists_exactly_the_seed_inputs(server):
    schema = request("GET", f"{server.url}/openapi.json").body
    components = schema["components"]["schemas"]
    props = components["Input"]["properties"]
    assert sorted(props, key=lambda n: props[n]["x-order"]) == [name for name, *_ in SEED_INPUTS]
    for name, _, default, choices in SEED_INPUTS:
        assert props[name].get("default") == default, name
        assert props[name]["description"] == SEED_DESCRIPTIONS[name]
        if choices:
            assert components[name]["enum"] == choices
    assert components["Output"] == {"type": "string", "format": "uri", "title": "Output"}


def test_committed_schema_matches_predict_py(tmp_path):
    """.cog/openapi_schema.json (and the streaming and loop models' schemas) are what the Cog SDK's
    generator makes of predict.py today."""
    fresh, stream, loop = tmp_path / "schema.json", tmp_path / "stream.json", tmp_path / "loop.json"
    subprocess.run(
        [str(ROOT / "script" / "schema"), str(fresh), str(stream), str(loop)], check=True, cwd=ROOT, capture_output=True
    )
    committed = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    assert json.loads(fresh.read_text()) == committed, "predict.py changed: run script/schema"
    committed = json.loads((ROOT / ".cog" / "stream" / "openapi_schema.json").read_text())
    assert json.loads(stream.read_text()) == committed, "predict.py changed: run script/schema"
    committed = json.loads((ROOT / ".cog" / "loop" / "openapi_schema.json").read_text())
    assert json.loads(loop.read_text()) == committed, "predict.py changed: run script/schema"


@pytest.mark.parametrize("fmt, mime", [("wav", "audio/wav"), ("mp3", "audio/mpeg")])
def test_sync_text_prediction(server, fmt, mime):
    response = server.predict({"prompt": "lo-fi beat", "duration": 2, "output_format": fmt, "seed": 1})
    data, rate = audio_of(response)
    assert rate == RATE and data.shape[0] == 2
    assert data_uri_bytes(response.body["output"])[0] == mime
    if fmt == "wav":
        assert data.shape[1] == 2 * RATE
    else:
        assert abs(data.shape[1] - 2 * RATE) <= 2 * 1152 + 529
    logs = response.body["logs"]
    for line in (
        "model: facebook/musicgen-stereo-melody-large; mode: text",
        "seed: 1",
        "generated 2.0 s / 2.0 s of audio (100%)",
        "generated 2 s in",
        "decoded with EnCodec in",
        "wrote musicgen-",
    ):
        assert line in logs, logs
    assert logs.count("generated ") <= 12  # progress every tenth, not every token


def test_melody_from_a_data_uri(server, tmp_path):
    import base64

    tune = write(tmp_path / "tune.wav", melody([262, 330, 392, 523], 0.5, 22050, 1), 22050)
    uri = "data:audio/wav;base64," + base64.b64encode(tune.read_bytes()).decode()
    response = server.predict({"prompt": "jazz", "input_audio": uri, "duration": 2, "seed": 2})
    data, rate = audio_of(response)
    assert (data.shape, rate) == ((2, 2 * RATE), RATE)
    assert "mode: melody" in response.body["logs"]


def test_continuation_from_a_url(server, peer):
    response = server.predict(
        {
            "prompt": "jazz",
            "input_audio": f"{peer.url}/intro.ogg",
            "continuation": True,
            "duration": 1,
            "output_format": "mp3",
            "seed": 3,
        }
    )
    data, rate = audio_of(response)
    assert rate == RATE and data.shape[0] == 2
    assert abs(data.shape[1] - (1.5 + 1) * RATE) <= 2 * 1152 + 529  # 1.5 s of prompt + 1 s
    assert "mode: continuation" in response.body["logs"]


def test_async_with_webhooks_and_idempotent_put(server, peer):
    inputs = {"prompt": "ambient", "duration": 1, "seed": 4}
    first = server.predict(inputs, prediction_id="async-1", asynchronous=True, webhook=f"{peer.url}/hook")
    assert first.status == 202 and first.body["id"] == "async-1"
    again = server.predict(inputs, prediction_id="async-1", asynchronous=True, webhook=f"{peer.url}/hook")
    assert again.status == 202 and again.body["id"] == "async-1"  # same id: the same prediction
    final = peer.final_webhook("async-1")
    assert final["status"] == "succeeded"
    assert final["output"].startswith("data:audio/wav;base64,")
    assert "seed: 4" in final["logs"]
    time.sleep(0.5)
    finals = [w for w in peer.webhooks if w["id"] == "async-1" and w["status"] == "succeeded"]
    assert len(finals) == 1  # the repeated PUT did not run it twice


def test_busy_server_answers_409_beyond_its_concurrency(server, peer):
    """cog.yaml's concurrency.max predictions run at once; Cog answers 409 to the next one."""
    import yaml

    slots = yaml.safe_load((ROOT / "cog.yaml").read_text())["concurrency"]["max"]
    ids = [f"busy-{i}" for i in range(slots)]
    for i, pid in enumerate(ids):
        started = server.predict(
            {"prompt": "long", "duration": 20, "seed": 5 + i},
            prediction_id=pid,
            asynchronous=True,
            webhook=f"{peer.url}/hook",
        )
        assert started.status == 202
    extra = server.predict({"prompt": "another", "duration": 1}, retry_busy=0)
    assert extra.status == 409, extra
    # cancel once each is generating: coglet 0.23.1 has a race for async predictors, where a cancel
    # that arrives while it is still submitting the coroutine fails the prediction ("Failed to
    # submit coroutine: CancelationException") and the coroutine runs on unseen (docs/concurrency.md)
    for pid in ids:
        peer.wait_logs(pid, "seed: ")
    for pid in ids:
        assert server.cancel(pid).status == 200
    for pid in ids:
        final = peer.final_webhook(pid)
        assert final["status"] == "canceled", final.get("error")


def _concurrently(fn, args_list):
    results = [None] * len(args_list)

    def run(i, args):
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i, args)) for i, args in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_predictions_share_steps_and_equal_their_solo_runs(server):
    """Four predictions at once, different prompts, durations and seeds: none is refused, they share
    decoding steps, each prediction's logs are its own, and each output is bit for bit the output of
    the same request run alone."""
    requests = [
        {"prompt": "lo-fi beat", "duration": 2, "seed": 11},
        {"prompt": "jazz trio", "duration": 3, "seed": 12},
        {"prompt": "metal", "duration": 1, "seed": 13, "top_k": 20},
        {"prompt": "ambient pads", "duration": 2, "seed": 14, "temperature": 0.8, "output_format": "mp3"},
    ]
    # slots freed by the previous test's cancels can lag its final webhooks by a moment, and a sync
    # answer precedes the freeing of its own slot (docs/http.md): one prediction first, retried while
    # busy; then the four, each retrying a 409 for at most 2 s: the one slot that "settle" may still
    # hold frees within that, while the other three are already generating (CI once got 409 for the
    # fourth with no retry). That they ran together is asserted below from their shared steps.
    assert server.predict({"prompt": "settle", "duration": 1, "seed": 1}).status == 200
    together = _concurrently(lambda inputs: server.predict(inputs, retry_busy=2), [(r,) for r in requests])
    assert [r.status for r in together] == [200] * 4, [r.body for r in together]
    shared = []
    for inputs, response in zip(requests, together):
        assert response.body["status"] == "succeeded", response.body
        logs = response.body["logs"]
        assert f"seed: {inputs['seed']}" in logs and logs.count("seed: ") == 1, logs
        shared.append(int(logs.split("decoding steps shared with other requests: ")[1].split()[0]))
    assert max(shared) > 0, shared  # they did decode together
    for inputs, response in zip(requests, together):
        alone = server.predict(inputs)
        assert "decoding steps shared with other requests: 0 of" in alone.body["logs"]
        assert data_uri_bytes(alone.body["output"]) == data_uri_bytes(response.body["output"]), inputs


def test_cancel_and_bad_input_inside_a_batch(server, peer):
    """One request of a batch cancelled, another with an input that breaks a rule: only those two
    end that way, the others succeed."""
    runs = {f"batch-{i}": {"prompt": f"tune {i}", "duration": 4, "seed": 20 + i} for i in range(3)}
    for pid, inputs in runs.items():
        assert server.predict(inputs, prediction_id=pid, asynchronous=True, webhook=f"{peer.url}/hook").status == 202
    # continuation without audio; retried like the requests above: the previous test's last sync
    # answer may still hold its slot for a moment
    bad = server.predict({"prompt": "x", "continuation": True, "duration": 2}, retry_busy=2)
    assert bad.status == 200 and bad.body["status"] == "failed" and "input_audio" in bad.body["error"]
    peer.wait_logs("batch-1")
    assert server.cancel("batch-1").status == 200
    assert peer.final_webhook("batch-1", timeout=10)["status"] == "canceled"
    for pid in ("batch-0", "batch-2"):
        final = peer.final_webhook(pid)
        assert final["status"] == "succeeded", final


def test_cancel_mid_generation_then_predict_again(server, peer):
    before = server.rss_mb()
    started = server.predict(
        {"prompt": "epic", "duration": 60, "seed": 6},
        prediction_id="cancel-1",
        asynchronous=True,
        webhook=f"{peer.url}/hook",
    )
    assert started.status == 202
    peer.wait_logs("cancel-1")  # generation under way
    asked = time.monotonic()
    assert server.cancel("cancel-1").status == 200
    final = peer.final_webhook("cancel-1", timeout=10)
    latency = time.monotonic() - asked
    assert final["status"] == "canceled"
    assert latency < 2.0, latency
    # generation stopped: no progress lines after the cancel in a later prediction's view
    after = server.predict({"prompt": "after", "duration": 1, "seed": 7})
    assert after.body["status"] == "succeeded"
    assert "60.0 s" not in after.body["logs"]
    growth = server.rss_mb() - before
    print(f"cancel latency {latency * 1000:.0f} ms; worker RSS {before:.0f} MB -> {before + growth:.0f} MB")
    assert growth < 150, growth


def test_bad_inputs_answer_422_with_details(server):
    response = server.predict({"prompt": "x", "output_format": "flac", "duration": "long", "top_p": 3})
    assert response.status == 422
    fields = {d["loc"][-1] for d in response.body["detail"]}
    assert fields == {"output_format", "duration", "top_p"}
    assert server.predict({"prompt": "x", "duration": 0}).status == 422  # minimum 1
    assert server.predict({"prompt": "x", "seed": -5}).status == 422  # minimum -1


def test_cross_field_rules_fail_with_the_message_and_no_traceback(server):
    response = server.predict({"prompt": "x", "continuation": True})
    assert response.status == 200 and response.body["status"] == "failed"
    assert "continuation: needs input_audio" in response.body["error"]
    assert "Traceback" not in (response.body.get("logs") or "")
    response = server.predict({"prompt": "x", "temperature": 0})
    assert "temperature: must be greater than 0" in response.body["error"]
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.slow
def test_twenty_predictions_in_a_row(server):
    server.predict({"prompt": "warm up", "duration": 1, "seed": 0})
    before = server.rss_mb()
    lengths = []
    for i in range(20):
        fmt = "mp3" if i % 4 == 3 else "wav"
        data, rate = audio_of(server.predict({"prompt": f"song {i}", "duration": 1, "seed": i, "output_format": fmt}))
        assert rate == RATE and data.shape[0] == 2
        lengths.append(data.shape[1])
    after = server.rss_mb()
    print(f"worker RSS over 20 predictions: {before:.0f} MB -> {after:.0f} MB")
    assert all(n == RATE for i, n in enumerate(lengths) if i % 4 != 3)
    assert after - before < 100, (before, after)
    # each output in a folder of its own, kept until it expires (outputs.KEEP_SECONDS; tests/test_outputs.py)
    folders = list(server.tmp.glob("musicgen-out-*"))
    assert len(folders) >= 20 and all(len(list(f.iterdir())) == 1 for f in folders)


def test_upload_url_receives_the_file(servers, peer):
    upload = servers["upload"]
    upload.wait()
    response = upload.predict({"prompt": "uploaded", "duration": 1, "seed": 8})
    assert response.body["status"] == "succeeded", response.body
    url = response.body["output"]
    assert url.startswith(f"{peer.url}/stored/uploads/musicgen-") and url.endswith(".wav")
    uploaded = peer.uploads[url[len(f"{peer.url}/stored") :]]
    path = Path(f"/tmp/upload-test-{time.monotonic_ns()}.wav")
    path.write_bytes(uploaded)
    try:
        data, rate = decode(path)
    finally:
        path.unlink()
    assert (data.shape, rate) == ((2, RATE), RATE)


def test_missing_weights_fail_setup_readably(servers):
    broken = servers["broken"]
    broken.wait(until=("SETUP_FAILED",))
    setup = broken.health()["setup"]
    assert setup["status"] == "failed"
    assert "facebook/musicgen-stereo-melody-large/state_dict.bin" in setup["logs"]
    assert "script/download-weights" in setup["logs"]


# ------------------------------------------------------------------ hostile input and faults


def test_a_playlist_uploaded_as_input_audio_is_refused(server, peer, tmp_path):
    """An HLS playlist naming a local file, sent as a data URI and as a URL named .m3u8: FFmpeg left to
    itself would decode the local file and send its samples back (continuation mode)."""
    import base64

    secret = write(Path(peer.folder) / "secret.flac", melody([440], 1.0, RATE, 1), RATE)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n"
    (Path(peer.folder) / "list.m3u8").write_text(playlist)
    uri = "data:application/vnd.apple.mpegurl;base64," + base64.b64encode(playlist.encode()).decode()
    for source in (uri, f"{peer.url}/list.m3u8"):
        start = time.monotonic()
        response = server.predict({"prompt": "x", "input_audio": source, "continuation": True, "duration": 1})
        assert response.body["status"] == "failed", response.body
        assert "input_audio: could not be read as audio" in response.body["error"], response.body["error"]
        assert "playlist" in response.body["error"] and "Traceback" not in response.body["error"]
        assert time.monotonic() - start < 10
    assert audio_of(server.predict({"prompt": "x", "duration": 1, "seed": 1}))[0].shape == (2, RATE)  # still serving


@pytest.mark.slow  # (test_outputs.py checks the same cleaning in-process, in the quick loop)
def test_concurrent_predictions_with_thousands_of_expired_folders(server):
    """A busy server's cleanup runs in every prediction: four at once, three rounds, with thousands of
    expired output folders of the worker to remove each round (they used to fail each other with
    FileNotFoundError)."""
    import os

    audio_of(server.predict({"prompt": "x", "duration": 1, "seed": 1}))
    owners = {p.name.split("-")[2] for p in server.tmp.glob("musicgen-out-*")}
    assert len(owners) == 1, owners  # the worker's pid, from its own output folders
    pid = owners.pop()
    past = time.time() - 3600
    for round_ in range(3):
        for i in range(2000):
            folder = server.tmp / f"musicgen-out-{pid}-expired{round_}x{i}"
            folder.mkdir()
            (folder / "musicgen-old.wav").write_bytes(b"x")
            os.utime(folder, (past, past))
        results = [None] * 4

        def one(i: int) -> None:
            results[i] = server.predict({"prompt": "lo-fi", "duration": 1, "seed": 10 + i})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = [r.body["status"] if isinstance(r.body, dict) else r.status for r in results]
        assert statuses == ["succeeded"] * 4, [r.body for r in results if r.body.get("status") != "succeeded"]
    assert not list(server.tmp.glob(f"musicgen-out-{pid}-expired*"))
