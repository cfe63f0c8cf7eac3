"""Prepared decoders on disk (musicgen_service/decoding/prepared.py): the second setup reads what the
first measured and converted, gives the same tokens, and any bad entry costs one rebuild.

The format is forced (``int8`` where this CPU runs it, else ``fp16``), whatever ``auto`` would pick
here: the tests are about the cache, not about the choice; ``auto``'s decision has its own test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MONO_TEXT, make_service

from musicgen_service.decoding import formats, prepared
from musicgen_service.weights import hub as weights

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "int8" if formats.unavailable_reason("int8", torch.device("cpu")) is None else "fp16"


def service(tiny_weights, folder: Path, decoder: str = FORMAT, **settings):
    return make_service(tiny_weights, MONO_TEXT, decoder=decoder, prepared=folder, **settings)


def tokens(svc) -> torch.Tensor:
    return svc.generator.generate(svc.parse(prompt="lo-fi beat", duration=1, seed=7)).tokens


def entries(folder: Path):
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


@pytest.fixture(scope="module")
def clean(tiny_weights, tmp_path_factory):
    """A first boot: no entry yet; returns the folder and the tokens of a clean start."""
    folder = tmp_path_factory.mktemp("prepared")
    svc = service(tiny_weights, folder)
    assert svc.generator.decoder.prepared is None and svc.generator.decoder.mode == FORMAT
    assert len(entries(folder)) == 1
    return folder, tokens(svc)


def test_second_setup_reads_the_entry_and_gives_the_same_tokens(tiny_weights, clean, capsys):
    folder, reference = clean
    svc = service(tiny_weights, folder)
    decoder = svc.generator.decoder
    assert decoder.prepared is not None and decoder.mode == FORMAT
    assert "read from the prepared cache" in decoder.describe()
    # the LM's own matrices were never read from the checkpoint: the entry holds them
    lm = svc.model.lm
    assert lm.transformer.layers[0].linear1.weight.numel() == 0 and lm.linears[0].weight.numel() == 0
    assert lm.emb[0].weight.numel() > 0
    assert torch.equal(tokens(svc), reference)
    assert "prepared decoder stored" not in capsys.readouterr().out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _wrong_key(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["key"]["threads"] += 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (_truncate, prepared.MATRICES, "bytes"),
        pytest.param(_flip, prepared.MATRICES, "sha256 differs", marks=pytest.mark.slow, id="flipped-byte"),
        (_wrong_key, prepared.MANIFEST, "another checkpoint, machine or settings"),
        pytest.param(
            lambda p: p.write_text("{not json"),
            prepared.MANIFEST,
            "manifest unreadable",
            marks=pytest.mark.slow,
            id="garbled-manifest",
        ),
        pytest.param(
            lambda p: p.unlink(), prepared.MATRICES, "weights missing", marks=pytest.mark.slow, id="missing-weights"
        ),
    ],
)
def test_a_damaged_entry_costs_one_rebuild_and_the_same_tokens(
    tiny_weights, clean, tmp_path, capsys, damage, file, reason
):
    folder, reference = clean
    own = tmp_path / "prepared"
    service(tiny_weights, own)  # an entry of this test's own
    (entry,) = entries(own)
    damage(entry / file)
    capsys.readouterr()
    svc = service(tiny_weights, own)
    out = capsys.readouterr().out
    assert f"prepared decoder in {entry} unusable (" in out and reason in out, out
    assert "prepared decoder stored in" in out  # rebuilt
    assert svc.generator.decoder.prepared is None
    assert torch.equal(tokens(svc), reference)
    assert [p.name for p in entries(own)] == [entry.name] and not [p for p in own.iterdir() if p.name.startswith(".")]
    assert service(tiny_weights, own).generator.decoder.prepared is not None  # and the rebuilt one reads


def test_auto_decision_is_kept_with_its_table(tiny_weights, tmp_path, capsys):
    first = service(tiny_weights, tmp_path, decoder="auto")
    trials = [t.row() for t in first.generator.decoder.trials]
    second = service(tiny_weights, tmp_path, decoder="auto")
    decoder = second.generator.decoder
    assert decoder.prepared is not None and decoder.mode == first.generator.decoder.mode
    assert [t.row() for t in decoder.trials] == trials
    assert decoder.describe().startswith(f"{decoder.mode} (auto, read from the prepared cache")
    assert torch.equal(tokens(second), tokens(first))


def test_what_the_key_holds_changes_the_entry(tiny_weights, tmp_path):
    service(tiny_weights, tmp_path)
    service(tiny_weights, tmp_path, concurrency=2)  # a step decodes 4 rows: auto's measurement differs
    service(tiny_weights, tmp_path, decoder="fp16" if FORMAT == "int8" else "bf16")
    assert len(entries(tmp_path)) == 3


def test_an_unwritable_folder_falls_back_to_the_next(tiny_weights, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere: a file where the folder should be stands in for it
        locked = tmp_path / "locked"
        locked.write_text("not a folder")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    fallback = tmp_path / "cache" / "musicgen" / "prepared"
    svc = make_service(tiny_weights, MONO_TEXT, decoder=FORMAT, prepared=locked, cache_home=tmp_path / "cache")
    assert f"cannot write into {locked}" in capsys.readouterr().out
    assert len(entries(fallback)) == 1
    again = make_service(tiny_weights, MONO_TEXT, decoder=FORMAT, prepared=locked, cache_home=tmp_path / "cache")
    assert again.generator.decoder.prepared is not None
    assert torch.equal(tokens(again), tokens(svc))


def test_exact_and_off_use_no_entry(tiny_weights, tmp_path):
    make_service(tiny_weights, MONO_TEXT, decoder="exact", prepared=tmp_path / "a")
    make_service(tiny_weights, MONO_TEXT, decoder=FORMAT, prepared=tmp_path / "b", prepared_off=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpoint_identity(tiny_weights, tmp_path):
    lm = weights.cached_file(tiny_weights, weights.HubFile(MONO_TEXT, weights.LM_FILE))
    hub = weights.checkpoint_identity(lm)  # a hub blob: its name is the content's sha256
    assert hub == {"size": lm.stat().st_size, "sha256": lm.resolve().name}
    copy = tmp_path / "state_dict.bin"
    copy.write_bytes(lm.read_bytes())
    local = weights.checkpoint_identity(copy)
    assert set(local) == {"size", "sampled_sha256"} and local == weights.checkpoint_identity(copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1  # the middle sample
    copy.write_bytes(bytes(data))
    assert weights.checkpoint_identity(copy) != local


@pytest.mark.slow
def test_two_processes_starting_together_leave_one_whole_entry(tiny_weights, tmp_path):
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from musicgen_service.serving.service import Service; from musicgen_service.core.settings import Settings;"
        "from pathlib import Path;"
        f"Service(Settings(weights_dir=Path(sys.argv[2]), model={MONO_TEXT!r}, device='cpu', "
        f"decoder={FORMAT!r}, prepared=Path(sys.argv[3])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ROOT), str(tiny_weights), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(entries(tmp_path)) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert service(tiny_weights, tmp_path).generator.decoder.prepared is not None


def test_leftovers_are_swept_and_the_cache_is_kept_under_its_bound(tmp_path):
    """A process killed mid-write leaves a ``.tmp-*`` folder; entries accumulate with every checkpoint,
    machine and setting: leftovers of stopped processes are removed, and past the bound the least
    recently used entries go first (a read counts as a use)."""
    import os
    import subprocess
    import sys
    import time

    from musicgen_service.decoding import prepared

    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    leftover = tmp_path / f".tmp-{'a' * 32}-{dead}-{'b' * 8}"
    leftover.mkdir()
    (leftover / "matrices.pt").write_bytes(bytes(1000))
    live = tmp_path / f".tmp-{'c' * 32}-{os.getpid()}-{'d' * 8}"
    live.mkdir()
    entries = []
    for i, name in enumerate(("1" * 32, "2" * 32, "3" * 32)):
        entry = tmp_path / name
        entry.mkdir()
        (entry / prepared.MATRICES).write_bytes(bytes(1000))
        (entry / prepared.MANIFEST).write_text("{}")
        os.utime(entry / prepared.MANIFEST, (time.time() - 100 + i, time.time() - 100 + i))
        entries.append(entry)
    os.utime(entries[0] / prepared.MANIFEST)  # the oldest entry was just read: now the most recent
    prepared.Cache([tmp_path], max_bytes=2100).sweep()
    assert not leftover.exists() and live.exists()
    assert [e.exists() for e in entries] == [True, False, True]
    prepared.Cache([tmp_path]).sweep()  # unbounded: nothing more goes
    assert entries[0].exists() and entries[2].exists()
