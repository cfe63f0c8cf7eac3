"""Hostile training datasets: archive bombs, odd members, endless audio, huge captions. Each is refused
with a message naming ``dataset``, in bounded time and memory, nothing written outside its folder."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import resource
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from audio_helpers import melody

from musicgen_service.core.errors import Cancelled, InputError
from musicgen_service.training import dataset

RATE = 32000
ROOT = Path(__file__).resolve().parent.parent


def wav_bytes(seconds: float) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, melody([330], seconds, RATE, 1).T, RATE, format="WAV")
    return buf.getvalue()


def refused(path: Path, fragment: str, tmp_path: Path, **kw) -> InputError:
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        dataset.unpack(path, tmp_path / "unpacked", **kw)
    assert time.perf_counter() - start < 10, "refused too slowly"
    assert info.value.fields == ["dataset"], info.value
    assert fragment in str(info.value), info.value
    return info.value


def repeated_gzip(block: bytes, times: int, path: Path) -> Path:
    """``block`` repeated ``times`` times, as concatenated gzip members (one compressed once)."""
    member = gzip.compress(block, compresslevel=9)
    with open(path, "wb") as f:
        for _ in range(times):
            f.write(member)
    return path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_ten_million_empty_members_are_refused_at_the_limit_not_listed(tmp_path):
    """22 MB of gzip declaring ten million members: tarfile.getmembers() would hold them all (GBs)."""
    header = tarfile.TarInfo("d/")
    header.type = tarfile.DIRTYPE
    block = header.tobuf() * 100_000
    bomb = repeated_gzip(block, 100, tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 25e6
    before = peak_mb()
    refused(bomb, f"more than {dataset.MAX_MEMBERS} members", tmp_path)
    assert peak_mb() - before < 500


def test_a_member_declaring_terabytes_is_refused_at_its_header(tmp_path):
    huge = tarfile.TarInfo("music/huge.wav")
    huge.size = 2**40
    data = huge.tobuf(format=tarfile.GNU_FORMAT) + bytes(1 << 20)  # a megabyte of its "data", then nothing
    bomb = tmp_path / "huge.tar.bz2"
    bomb.write_bytes(bz2.compress(data))
    error = refused(bomb, "declares 1024.0 GB", tmp_path)
    assert "the limit" in str(error)


def test_a_long_name_record_of_gigabytes_is_refused_before_tarfile_reads_it(tmp_path):
    longname = tarfile.TarInfo("././@LongLink")
    longname.type, longname.size = tarfile.GNUTYPE_LONGNAME, 4 << 30
    head = longname.tobuf(format=tarfile.GNU_FORMAT)
    zeros = gzip.compress(bytes(64 << 20), compresslevel=1)
    bomb = tmp_path / "name.tar.gz"
    with open(bomb, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(64):  # 4 GB of zeros as the "name"
            f.write(zeros)
    before = peak_mb()
    refused(bomb, "declares a record of", tmp_path)
    assert peak_mb() - before < 500


def test_a_zip_of_too_many_entries_is_refused_from_its_end_record(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_MEMBERS", 1000)
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(1500):
            z.writestr(f"{i}.txt", b"")
    parsed = []
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: parsed.append(1))
    refused(path, "holds 1500 files", tmp_path)
    assert not parsed  # the directory was never parsed


@pytest.mark.parametrize(
    "members, fragment",
    [
        ([("a", b"x"), ("a/b.wav", wav_bytes(3))], "is inside 'a', which is a file"),
        ([("a/b.wav", wav_bytes(3)), ("a", b"x")], "is both a file and a folder"),
        ([("a.wav", wav_bytes(3)), ("a.wav", wav_bytes(3))], "appears twice"),
        ([("x" * 300 + ".wav", wav_bytes(3))], "longer than 255 bytes"),
        ([(".", b"x")], "an empty name"),
        ([("./", b"")], "an empty name"),
    ],
)
def test_odd_zip_members_are_refused_naming_dataset(tmp_path, members, fragment):
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    refused(path, fragment, tmp_path)
    assert not (tmp_path / "a").exists()  # nothing outside the folder


def test_an_encrypted_zip_member_is_refused(tmp_path):
    path = tmp_path / "secret.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.wav", wav_bytes(3))
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the encryption flag bit
        at = data.find(signature)
        data[at + offset] |= 1
    path.write_bytes(bytes(data))
    refused(path, "is encrypted", tmp_path)


def test_the_same_member_rules_for_tar(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as t:
        for name, data in (("a", b"x"), ("a/b.wav", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    refused(path, "which is a file", tmp_path)


def test_unpacking_stops_when_cancelled(tmp_path):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(5):
            z.writestr(f"{i}.wav", wav_bytes(1))
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        dataset.unpack(path, tmp_path / "unpacked", cancelled)


def test_a_megabyte_caption_is_read_in_part_and_cut_to_the_encoders_tokens(tiny_weights, tmp_path):
    from transformers import T5Tokenizer

    from musicgen_service.training import tokens

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.wav").write_bytes(wav_bytes(3))
    (folder / "a.txt").write_text("warm piano " * 100_000)  # 1.1 MB
    found = dataset.collect(folder)
    assert len(found.captions[folder / "a.wav"]) <= dataset.CAPTION_MAX_BYTES
    tokenizer = T5Tokenizer.from_pretrained("t5-base")
    cut = tokens.fit_caption(tokenizer, found.captions[folder / "a.wav"])
    assert len(tokenizer(cut).input_ids) <= tokens.MAX_TEXT_TOKENS
    assert cut.startswith("warm piano warm piano")
    assert tokens.fit_caption(tokenizer, "warm piano") == "warm piano"  # an ordinary caption is unchanged


def test_a_dataset_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    import soundfile

    monkeypatch.setattr(dataset, "MAX_DATASET_SECONDS", 90.0)
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.flac", "b.flac"):
        soundfile.write(str(folder / name), np.zeros((60 * RATE, 1), np.int16), RATE, format="FLAC")
    found = dataset.collect(folder)
    with pytest.raises(InputError, match="more than 0.025 hours of audio, the limit"):
        dataset.plan(folder, found, RATE, 1, 30.0)


def test_a_file_that_fails_part_way_gives_no_segments_to_the_plan(tmp_path):
    good = wav_bytes(40)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "cut.wav").write_bytes(good[: len(good) // 2])  # its header says 40 s
    (folder / "ok.wav").write_bytes(wav_bytes(3))
    found = dataset.collect(folder)
    planned = dataset.plan(folder, found, RATE, 1, 30.0)
    assert planned.usable.audio == [folder / "ok.wav"] and planned.summary["segments"] == 1
    assert "truncated" in dict(found.skipped)["cut.wav"]


@pytest.mark.slow
def test_hours_of_audio_are_tokenized_in_bounded_memory(tiny_weights, tmp_path):
    """One hour of silent FLAC (~1 MB) decodes to 460 MB at 32 kHz float: every segment used to stay
    in memory. Checked and tokenized as it decodes, the process grows by a few tens of MB."""
    import soundfile

    path = tmp_path / "hour.flac"
    with soundfile.SoundFile(str(path), "w", RATE, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(np.zeros((60 * RATE, 1), np.int16))
    script = f"""
import resource, sys
from pathlib import Path
from musicgen_service.weights import hub as weights; weights.use_hub_cache(Path({str(tiny_weights)!r}))
from musicgen_service.weights import loading
from musicgen_service.training import dataset, tokens
model = loading.load_musicgen(Path({str(tiny_weights)!r}), "facebook/musicgen-small", "cpu")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
folder = Path({str(tmp_path)!r})
planned = dataset.plan(folder, dataset.collect(folder), 32000, 1, 30.0)
features = tokens.compute(model, dataset.segments(folder, planned.usable, 32000, 1, 30.0), "", total_seconds=3600)
print(len(features.examples), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    segments, grown_mb = done.stdout.split()[-2:]
    assert int(segments) == 120
    assert float(grown_mb) < 150, grown_mb
