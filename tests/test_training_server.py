"""Fine-tuning through the real Cog server (coglet in train mode, as `cog train` runs an image): sync and
async trainings with webhooks, cancel, then trained versions served by a prediction server started
with COG_WEIGHTS (a path, and a URL downloaded by content)."""

from __future__ import annotations

import base64
import hashlib
import time
import zipfile
from pathlib import Path

import pytest
from audio_helpers import decode, melody, write
from server_helpers import CogServer, Peer, data_uri_bytes

pytestmark = pytest.mark.slow  # three servers and three trainings: about a minute on 2 cores

MODEL = "facebook/musicgen-small"


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("music")
    write(src / "a.wav", melody([262, 330, 392, 523], 1.5, 32000, 1), 32000)
    write(src / "b.wav", melody([220, 277, 330], 1.5, 44100, 2), 44100)
    (src / "a.txt").write_text("warm piano")
    path = src.parent / "music.zip"
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(src.iterdir()):
            z.write(p, f"songs/{p.name}")
    return path


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    p = Peer(tmp_path_factory.mktemp("peer"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def trainer(tiny_weights, tmp_path_factory):
    logs = tmp_path_factory.mktemp("train-logs")
    server = CogServer(tiny_weights, logs / "train.log", env={"MUSICGEN_MODEL": MODEL}, train=True)
    server.wait()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def trained_file(trainer, dataset_zip, tmp_path_factory) -> Path:
    response = trainer.train(
        {
            "dataset": data_uri(dataset_zip, "application/zip"),
            "epochs": 2,
            "batch_size": 2,
            "caption": "lo-fi",
            "seed": 4,
        }
    )
    assert response.status == 200 and response.body["status"] == "succeeded", response.body
    out = response.body["output"]
    assert set(out) == {"weights", "loss_curve", "sample_before", "sample_after"}
    assert data_uri_bytes(out["loss_curve"])[1][:4] == b"\x89PNG"
    for key in ("sample_before", "sample_after"):
        mime, data = data_uri_bytes(out[key])
        assert mime in ("audio/wav", "audio/x-wav", "audio/wave") and data[:4] == b"RIFF"
    logs = response.body["logs"]
    for line in (
        "dataset: 2 segments",
        "training: 2 updates",
        "allocator: blocks from 1024 KiB up mapped",
        "step 2/2",
        "trained file: musicgen-small-lora.safetensors",
    ):
        assert line in logs, logs[-3000:]
    path = tmp_path_factory.mktemp("trained") / "musicgen-small-lora.safetensors"
    path.write_bytes(data_uri_bytes(out["weights"])[1])
    return path


def test_async_training_with_webhooks(trainer, dataset_zip, peer, trained_file):
    response = trainer.train(
        {"dataset": data_uri(dataset_zip, "application/zip"), "epochs": 1, "batch_size": 2, "seed": 4},
        training_id="train-async-1",
        asynchronous=True,
        webhook=f"{peer.url}/hook",
    )
    assert response.status == 202, response.body
    final = peer.final_webhook("train-async-1", timeout=300)
    assert final["status"] == "succeeded", final.get("error")
    assert final["output"]["weights"].startswith("data:")


def test_bad_training_input_fails_with_the_rule(trainer, tmp_path):
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w"):
        pass
    response = trainer.train({"dataset": data_uri(empty, "application/zip")})
    assert response.body["status"] == "failed" and "dataset: holds no audio file" in response.body["error"]
    response = trainer.train({"dataset": data_uri(empty, "application/zip"), "batch_size": 0})
    assert response.status == 422  # Cog's schema: ge=1


def test_cancel_a_training(trainer, dataset_zip, peer):
    response = trainer.train(
        {
            "dataset": data_uri(dataset_zip, "application/zip"),
            "epochs": 0,
            "max_steps": 100000,
            "batch_size": 2,
            "seed": 5,
        },
        training_id="train-cancel-1",
        asynchronous=True,
        webhook=f"{peer.url}/hook",
    )
    assert response.status == 202
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the updates to start
        with peer.lock:
            logs = " ".join(w.get("logs") or "" for w in peer.webhooks if w.get("id") == "train-cancel-1")
        if "training: " in logs:
            break
        time.sleep(0.2)
    assert trainer.cancel("train-cancel-1", "trainings").status == 200
    final = peer.final_webhook("train-cancel-1", timeout=60)
    assert final["status"] == "canceled" and not final.get("output")


def test_a_trained_version_serves_predictions(tiny_weights, trained_file, peer, tmp_path):
    """A prediction server started with COG_WEIGHTS (as a hosted platform runs a trained version):
    a path, then a URL, which is downloaded and stored by its content's hash."""
    (Path(peer.folder) / "v1").mkdir()
    (Path(peer.folder) / "v1" / trained_file.name).write_bytes(trained_file.read_bytes())
    cache = tmp_path / "weights-cache"  # an empty folder of its own for downloads: MUSICGEN_WEIGHTS stays tiny
    for source in (str(trained_file), f"{peer.url}/v1/{trained_file.name}"):
        server = CogServer(
            tiny_weights,
            tmp_path / f"serve-{hashlib.md5(source.encode()).hexdigest()}.log",
            env={
                "MUSICGEN_MODEL": MODEL,
                "COG_WEIGHTS": source,
                "XDG_CACHE_HOME": str(cache),
                "MUSICGEN_DECODER": "exact",
            },
        )
        try:
            server.wait()
            setup_logs = server.health()["setup"]["logs"]
            assert ".safetensors: LoRA rank 16 of facebook/musicgen-small" in setup_logs, setup_logs[-2500:]
            if source.startswith("http"):  # stored under its content's hash, never its name
                digest = hashlib.sha256(trained_file.read_bytes()).hexdigest()
                assert f"stored as {digest}.safetensors" in setup_logs, setup_logs[-2500:]
            response = server.predict({"prompt": "lo-fi", "duration": 1, "seed": 2})
            assert response.body["status"] == "succeeded", response.body
            mime, data = data_uri_bytes(response.body["output"])
            out = tmp_path / "out.wav"
            out.write_bytes(data)
            assert decode(out)[0].shape == (1, 32000)
        finally:
            server.stop()
    stored = list((tiny_weights / "trained").glob("*.safetensors")) + list(cache.rglob("*.safetensors"))
    assert [p.name for p in stored] == [f"{hashlib.sha256(trained_file.read_bytes()).hexdigest()}.safetensors"]


def test_an_archive_bomb_is_refused_and_the_trainer_keeps_working(trainer, dataset_zip, peer):
    """Ten million tar members in 22 MB of gzip, sent by URL: refused within seconds, naming dataset;
    the same server then trains on a real dataset."""
    import gzip
    import tarfile

    header = tarfile.TarInfo("d/")
    header.type = tarfile.DIRTYPE
    member = gzip.compress(header.tobuf() * 100_000, compresslevel=9)
    bomb = Path(peer.folder) / "bomb.tar.gz"
    with open(bomb, "wb") as f:
        for _ in range(100):
            f.write(member)
    start = time.monotonic()
    response = trainer.train({"dataset": f"{peer.url}/bomb.tar.gz", "seed": 1})
    assert response.body["status"] == "failed", response.body
    assert "dataset: the archive holds more than" in response.body["error"], response.body["error"]
    assert time.monotonic() - start < 30  # (the server's own download of 22 MB included)
    response = trainer.train(
        {"dataset": data_uri(dataset_zip, "application/zip"), "epochs": 1, "batch_size": 2, "seed": 4}
    )
    assert response.body["status"] == "succeeded", response.body.get("error")
