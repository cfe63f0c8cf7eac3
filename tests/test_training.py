"""Fine-tuning on the tiny model set (CPU): data handling, the loss, LoRA and full training, the trained
file served back, data parallelism, and every bad input refused before training."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from audio_helpers import melody, write
from conftest import MONO_MELODY, MONO_TEXT, STEREO_MELODY, make_service

from musicgen_service.core.errors import InputError
from musicgen_service.core.settings import Settings
from musicgen_service.training import adapters, base_model, dataset, loop, options, parallel, run, tokens
from musicgen_service.weights import lora, trained

RATE = 32000


def settings_for(tiny_weights: Path, model: str = MONO_TEXT) -> Settings:
    return Settings(weights_dir=tiny_weights, model=model, device="cpu", prepared_off=True)


def opts(tiny_weights: Path, model: str = MONO_TEXT, **kw) -> options.Options:
    kw = {"epochs": 0, "max_steps": 2, "batch_size": 2, "caption": "lo-fi", "seed": 1, **kw}
    return options.parse(
        base_model=None, default_model=model, model_width=run.model_width(settings_for(tiny_weights, model)), **kw
    )


def tune(folder: Path, name: str, notes, seconds_per_note: float, rate: int = RATE, channels: int = 1) -> Path:
    return write(folder / name, melody(notes, seconds_per_note, rate, channels), rate)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A zip with nested folders: a 65 s file (two 30 s segments and a 5 s remainder) with a caption,
    a 3 s clip in 44.1 kHz stereo mp3... as wav, a 1 s clip (too short), a text file, macOS junk."""
    src = tmp_path_factory.mktemp("src")
    (src / "album" / "live").mkdir(parents=True)
    tune(src / "album", "long.wav", [262, 330, 392, 523, 440], 13.0)
    (src / "album" / "long.txt").write_text("warm piano arpeggios\n")
    tune(src / "album" / "live", "short.wav", [220, 277, 330], 1.0, 44100, 2)
    tune(src / "album", "tiny.wav", [440], 1.0)
    (src / "notes.md").write_text("not audio")
    path = src.parent / "dataset.zip"
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src).as_posix())
        z.writestr("__MACOSX/album/._long.wav", b"junk")
    return path


def test_dataset_segments_captions_and_skips(archive, tmp_path):
    root = dataset.unpack(archive, tmp_path / "unpacked")
    found = dataset.collect(root)
    segs = dataset.segments(root, found, RATE, 1, 30.0)
    by_source = {}
    for s in segs:
        by_source.setdefault(s.source, []).append(s)
    long = by_source["album/long.wav"]
    assert [round(s.seconds(RATE), 3) for s in long] == [30.0, 30.0, 5.0]  # the remainder kept
    assert [s.start for s in long] == [0.0, 30.0, 60.0]
    assert all(s.caption == "warm piano arpeggios" for s in long)
    (short,) = by_source["album/live/short.wav"]  # a short clip at its own length, resampled, mono
    assert short.wav.shape == (1, 3 * RATE) and short.caption is None
    assert dict(found.skipped) == {"notes.md": "not an audio file", "album/tiny.wav": "shorter than 2 s"}


def test_padding_is_masked_out_of_the_loss(tiny_weights):
    """A short segment beside a long one is padded with the special token and masked: its loss is the
    one it has alone."""
    model = make_service(tiny_weights, MONO_TEXT, decoder="exact").model
    lm = model.lm
    g = torch.Generator().manual_seed(0)
    short = tokens.Example(torch.randint(0, 2048, (4, 60), generator=g, dtype=torch.int16), "x", None, "a", 0)
    long = tokens.Example(torch.randint(0, 2048, (4, 150), generator=g, dtype=torch.int16), "x", None, "b", 0)
    features = tokens.Features(examples=[short, long], text={"x": torch.randn(3, 768, generator=g)})
    codes, real = loop.batch_codes(lm, [short, long], "cpu")
    assert (codes[0, :, 60:] == lm.special_token_id).all() and not real[0, :, 60:].any()
    assert real[1].sum() == 150 * 4 - (1 + 2 + 3)  # the delay pattern's last steps, as compute_predictions masks
    predict = loop._Predictions(lm)
    none = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        out = predict(codes, tokens.conditions(lm, features, [short, long], none, none))
        per_item = [
            loop.cross_entropy(out.logits[i : i + 1].float(), codes[i : i + 1], (real & out.mask)[i : i + 1])
            for i in range(2)
        ]
        alone = loop.loss_of(predict, lm, features, [short], none[:1], none[:1], torch.autocast("cpu", enabled=False))
    assert torch.allclose(per_item[0], alone, atol=1e-5)


@pytest.mark.parametrize("model", [MONO_TEXT, STEREO_MELODY])
def test_cached_features_give_the_condition_providers_own_conditions(tiny_weights, model):
    """tokens.conditions (cached T5 states and chroma, projected at each step) equals what the LM's
    condition provider computes from the segment itself, text and melody."""
    from musicgen_service.training.tokens import _attributes

    m = make_service(tiny_weights, model, decoder="exact").model
    wav = torch.from_numpy(melody([262, 392, 330], 1.0, RATE, m.audio_channels))
    seg = dataset.Segment("a.wav", 0.0, wav, "jazz trio")
    features = tokens.compute(m, [seg], "unused")
    none = torch.zeros(1, dtype=torch.bool)
    ours = tokens.conditions(m.lm, features, features.examples, none, none)
    melody_model = tokens.MELODY in m.lm.condition_provider.conditioners
    attrs = [_attributes("jazz trio", wav if melody_model else None, RATE, melody_model, "cpu")]
    from musicgen_service.generation.seeding import demucs_random

    with torch.no_grad(), demucs_random(tokens.segment_seed(0, 0)):  # (demucs' shifts, as tokens.compute's)
        theirs = m.lm.condition_provider(m.lm.condition_provider.tokenize(attrs))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.allclose(ours[name][0], theirs[name][0], atol=1e-5), name
        assert torch.equal(ours[name][1].long(), theirs[name][1].long()), name


@pytest.fixture(scope="module")
def lora_run(tiny_weights, tmp_path_factory):
    """LoRA overfitting one 4 s clip for 30 updates."""
    folder = tmp_path_factory.mktemp("one")
    clip = tune(folder, "clip.wav", [262, 330, 392, 523], 1.0)
    out = tmp_path_factory.mktemp("lora-out")
    o = opts(tiny_weights, max_steps=30, batch_size=1, learning_rate=1e-2, lora_rank=8)
    return run.run(clip, o, settings_for(tiny_weights), out, sample_seconds=1), clip


def test_training_lowers_the_loss_and_writes_one_file(lora_run):
    res, _ = lora_run
    m = res.manifest
    assert m["loss_after"] < 0.5 * m["loss_before"], m  # 7.56 -> 0.07 measured: overfits one clip
    assert res.weights.suffix == ".safetensors" and res.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.sample_before.is_file() and res.sample_after.is_file()
    t = trained.Trained(res.weights)
    assert t.method == "lora" and t.base_model == MONO_TEXT and m["rank"] == 8
    assert all(v.dtype == torch.float16 for v in t.tensors().values())
    assert {n.rsplit(".lora_", 1)[0] for n in t.names} == set(m["targets"])
    assert any("in_proj_weight" in n for n in m["targets"]) and any(n.startswith("linears.") for n in m["targets"])
    assert m["dataset"]["segments"] == 1 and m["training"]["steps"] == 30
    assert len([p for p in res.weights.parent.iterdir() if p.name.startswith("musicgen-train-")]) == 0


@pytest.mark.slow
def test_same_seed_same_weights(tiny_weights, lora_run, tmp_path):
    res, clip = lora_run
    again = run.run(
        clip,
        opts(tiny_weights, max_steps=30, batch_size=1, learning_rate=1e-2, lora_rank=8),
        settings_for(tiny_weights),
        tmp_path,
        sample_seconds=0,
    )
    a, b = trained.Trained(res.weights).tensors(), trained.Trained(again.weights).tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_trained_file_is_served_and_changes_the_tokens(tiny_weights, lora_run, monkeypatch):
    res, _ = lora_run
    req = dict(prompt="lo-fi", duration=1, seed=11)
    base = make_service(tiny_weights, MONO_TEXT, decoder="exact")
    served = make_service(tiny_weights, MONO_TEXT, decoder="exact", trained=str(res.weights))
    assert served.trained is not None
    t_base = base.generator.generate(base.parse(**req)).tokens
    t_tuned = served.generator.generate(served.parse(**req)).tokens
    assert not torch.equal(t_base, t_tuned)
    # through setup(weights=...), as Cog passes COG_WEIGHTS, and through MUSICGEN_TRAINED
    from predict import Predictor

    monkeypatch.setenv("MUSICGEN_MODEL", MONO_TEXT)
    monkeypatch.setenv("MUSICGEN_DECODER", "exact")
    p = Predictor()
    p.setup(weights=res.weights)
    assert torch.equal(p.service.generator.generate(p.service.parse(**req)).tokens, t_tuned)
    monkeypatch.setenv("MUSICGEN_TRAINED", str(res.weights.parent))  # a folder holding the file
    p2 = Predictor()
    p2.setup()
    assert torch.equal(p2.service.generator.generate(p2.service.parse(**req)).tokens, t_tuned)


@pytest.mark.slow
def test_every_decoder_serves_the_merged_lora(tiny_weights, lora_run, tmp_path):
    """The LoRA is merged before the decoder prepares its weights: a reduced precision serves it too,
    and a prepared decoder made from it is keyed by it (a base model's entry is not reused)."""
    res, _ = lora_run
    req = dict(prompt="lo-fi", duration=1, seed=11)
    exact = make_service(tiny_weights, MONO_TEXT, decoder="exact", trained=str(res.weights))
    fp16 = make_service(tiny_weights, MONO_TEXT, decoder="fp16", trained=str(res.weights), prepared=tmp_path)
    base16 = make_service(tiny_weights, MONO_TEXT, decoder="fp16", prepared=tmp_path)
    again = make_service(tiny_weights, MONO_TEXT, decoder="fp16", trained=str(res.weights), prepared=tmp_path)
    assert again.generator.decoder.prepared is not None and base16.generator.decoder.prepared is None
    a = exact.generator.generate(exact.parse(**req)).tokens
    b = fp16.generator.generate(fp16.parse(**req)).tokens
    c = again.generator.generate(again.parse(**req)).tokens
    assert torch.equal(b, c) and (a == b).float().mean() > 0.9  # fp16 vs fp32: near-ties may differ


def test_another_base_model_is_refused_naming_both(tiny_weights, lora_run):
    res, _ = lora_run
    with pytest.raises(
        trained.TrainedError,
        match="trained on facebook/musicgen-small, but this service serves facebook/musicgen-melody",
    ):
        make_service(tiny_weights, MONO_MELODY, decoder="exact", trained=str(res.weights))


@pytest.mark.slow
def test_full_fine_tune_of_a_melody_model_keeps_its_melody(tiny_weights, tmp_path):
    """Full training of a melody model runs with the segments' chroma; the trained model still
    conditions on a melody: two melodies, same seed, different music."""
    clip = tune(tmp_path, "clip.wav", [262, 330, 392, 523], 1.5)
    o = opts(tiny_weights, MONO_MELODY, method="full", max_steps=2, batch_size=1)
    res = run.run(clip, o, settings_for(tiny_weights, MONO_MELODY), tmp_path, sample_seconds=0)
    assert res.manifest["method"] == "full" and trained.Trained(res.weights).method == "full"
    svc = make_service(tiny_weights, MONO_MELODY, decoder="exact", trained=str(res.weights))
    a = tune(tmp_path, "a.wav", [262, 392], 1.0)
    b = tune(tmp_path, "b.wav", [523, 330], 1.0)

    def gen(path):
        req = svc.parse(prompt="jazz", input_audio=str(path), duration=1, seed=3)
        return svc.generator.generate(req, svc.input_clip(req)).tokens

    assert not torch.equal(gen(a), gen(b))


def test_lora_attaches_to_the_fused_qkv_parameter_and_merges_exactly(tiny_weights):
    lm = make_service(tiny_weights, MONO_TEXT, decoder="exact").model.lm
    name = "transformer.layers.0.self_attn.in_proj_weight"
    before = lm.get_parameter(name).detach().clone()
    loras = adapters.attach(lm, rank=4, alpha=4.0, seed=0)
    assert (
        name in loras and not lm.transformer.layers[0].self_attn.parametrizations.in_proj_weight.original.requires_grad
    )
    with torch.no_grad():
        loras[name].B.normal_()
    expected = before + loras[name].B @ loras[name].A
    assert torch.allclose(lm.transformer.layers[0].self_attn.in_proj_weight, expected, atol=1e-5)
    state = adapters.state(loras)
    adapters.detach_merged(lm, loras)
    fresh = make_service(tiny_weights, MONO_TEXT, decoder="exact").model.lm
    lora.merge(fresh, state, 4, 4.0)
    assert torch.allclose(fresh.get_parameter(name), lm.get_parameter(name), atol=2e-3)  # fp16 storage


# ------------------------------------------------------------------------------------------ bad input


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    import soundfile

    soundfile.write(buf, melody([330], seconds, RATE, 1).T, RATE, format="WAV")
    return buf.getvalue()


def _train(tiny_weights, data: Path, tmp_path: Path, **kw):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return run.run(data, opts(tiny_weights, **kw), settings_for(tiny_weights), out, sample_seconds=0), out


@pytest.mark.parametrize(
    "members, message",
    [
        ({}, "holds no audio file"),
        ({"readme.txt": b"hello", "cover.jpg": b"\xff\xd8"}, "holds no audio file"),
        ({"a.wav": _wav_bytes(1.0), "b.wav": _wav_bytes(0.5)}, "every file is shorter than 2 s"),
        ({"a.wav": b"RIFF not really a wav"}, "could not be decoded"),
        ({"/etc/evil.wav": _wav_bytes(3)}, "has an absolute path: refused"),
        ({"../evil.wav": _wav_bytes(3)}, "has a '..' component: refused"),
    ],
)
def test_bad_archives_are_refused_before_training(tiny_weights, tmp_path, members, message):
    data = _zip(tmp_path / "data.zip", members)
    with pytest.raises(InputError, match=message) as info:
        _train(tiny_weights, data, tmp_path)
    assert info.value.fields == ["dataset"]
    out = tmp_path / "out"
    assert not list(out.glob("*.safetensors")) and not (tmp_path / "evil.wav").exists()
    assert not Path("/etc/evil.wav").exists()


def test_tar_links_and_traversal_are_refused(tiny_weights, tmp_path):
    data = tmp_path / "data.tar.gz"
    with tarfile.open(data, "w:gz") as t:
        link = tarfile.TarInfo("music/link.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    with pytest.raises(InputError, match="is a link: refused"):
        _train(tiny_weights, data, tmp_path)


def test_damaged_archive_and_limits(tiny_weights, tmp_path, monkeypatch):
    good = _zip(tmp_path / "good.zip", {f"{i}.wav": _wav_bytes(3) for i in range(3)})
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(InputError, match="damaged zip archive|not a readable zip"):
        _train(tiny_weights, damaged, tmp_path)
    monkeypatch.setattr(dataset, "MAX_FILES", 2)
    with pytest.raises(InputError, match="holds 3 files; the limit is 2"):
        _train(tiny_weights, good, tmp_path)
    monkeypatch.setattr(dataset, "MAX_FILES", 10)
    monkeypatch.setattr(dataset, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(InputError, match="the limit is"):
        _train(tiny_weights, good, tmp_path)


@pytest.mark.parametrize(
    "settings, field, message",
    [
        ({"batch_size": 0}, "batch_size", "at least 1"),
        ({"lora_rank": 100}, "lora_rank", "at most 32, the narrowest adapted matrix"),
        (
            {"base_model": "facebook/musicgen-large"},
            "base_model",
            "not in the weights folder; training never downloads",
        ),
        ({"gradient_accumulation": 3, "batch_size": 4}, "gradient_accumulation", "must divide batch_size"),
        ({"method": "dora"}, "method", "must be one of lora, full"),
        ({"learning_rate": 5.0}, "learning_rate", "at most 0.1"),
    ],
)
def test_impossible_settings_are_named(tiny_weights, settings, field, message):
    base = settings.pop("base_model", None)
    with pytest.raises(InputError, match=message) as info:
        options.parse(
            base_model=base,
            default_model=MONO_TEXT,
            model_width=run.model_width(settings_for(tiny_weights)),
            **{"seed": 1, **settings},
        )
    assert field in info.value.fields


@pytest.mark.slow
def test_data_parallel_update_equals_one_process_with_the_same_global_batch(tiny_weights, tmp_path):
    """Two CPU processes (gloo), each with half of every update's batch, against one process with
    the whole batch: the same gradient norms and the same adapters, within float tolerance."""
    m = make_service(tiny_weights, MONO_TEXT, decoder="exact").model
    segs = [
        dataset.Segment(f"{i}.wav", 0.0, torch.from_numpy(melody([262 + 40 * i, 392], 1.0, RATE, 1)), "lo-fi")
        for i in range(4)
    ]
    features = tokens.compute(m, segs, "lo-fi")
    o = opts(tiny_weights, max_steps=2, batch_size=4, learning_rate=1e-3)
    state, history = parallel.train_processes(settings_for(tiny_weights), o, features, 2, "gloo", tmp_path)
    single = base_model.load(settings_for(tiny_weights), MONO_TEXT, "cpu")
    params, loras = base_model.trainable(single, o, o.seed)
    one = loop.train(single.lm, features, o, params)
    assert history.grad_norms == pytest.approx(one.grad_norms, rel=1e-4)
    assert history.losses == pytest.approx(one.losses, rel=1e-5)
    ours = adapters.state(loras)
    assert all(torch.allclose(state[k].float(), ours[k].float(), atol=1e-3) for k in ours)


@pytest.mark.slow
def test_two_torchrun_processes_train_as_the_spawned_pair(tiny_weights, archive, tmp_path):
    """torchrun starting two CPU processes (gloo, the rendezvous torchrun sets up) trains as the
    run that spawns two workers itself: the same loss curve and the same adapters, to float tolerance.
    Rank 0 alone writes the files; the dataset is read only there."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    inputs = {"max_steps": 3, "epochs": 0, "batch_size": 4, "learning_rate": 1e-3, "caption": "lo-fi", "seed": 5}
    spawned = run.run(
        archive, opts(tiny_weights, **inputs), settings_for(tiny_weights), tmp_path, sample_seconds=0, world=2,
        backend="gloo",
    )  # fmt: skip
    out = tmp_path / "torchrun"
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "MUSICGEN_WEIGHTS": str(tiny_weights),
        "MUSICGEN_MODEL": MONO_TEXT,
        "MUSICGEN_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args += ["-m", "musicgen_service.tools.cli", "train", "-i", f"dataset=@{archive}", "-o", str(out)]
    args += [x for k, v in inputs.items() for x in ("-i", f"{k}={v}")]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 0 writes the trained files" in done.stdout + done.stderr
    files = list(out.glob("*.safetensors"))
    assert len(files) == 1
    ours, theirs = trained.Trained(files[0]), trained.Trained(spawned.weights)
    assert ours.manifest.training["world"] == theirs.manifest.training["world"] == 2
    assert ours.manifest.final_loss == pytest.approx(theirs.manifest.final_loss, rel=1e-4)
    assert ours.manifest.loss_after == pytest.approx(theirs.manifest.loss_after, rel=1e-4)
    a, b = load_file(str(files[0])), load_file(str(spawned.weights))
    assert set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


@pytest.mark.slow
def test_a_bad_dataset_under_torchrun_ends_every_process(tiny_weights, tmp_path):
    """Rank 0 refuses the dataset (no audio in it) and tells the others, which stop too: no process
    waits for ever for a dataset that will not come."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    bad = tmp_path / "notes.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("notes.md", "no audio here")
    env = {**os.environ, "PYTHONPATH": str(root), "MUSICGEN_WEIGHTS": str(tiny_weights), "MUSICGEN_MODEL": MONO_TEXT}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args += ["-m", "musicgen_service.tools.cli", "train", "-i", f"dataset=@{bad}", "-o", str(tmp_path / "out")]
    done = subprocess.run(
        args, cwd=root, env={**env, "MUSICGEN_DEVICE": "cpu"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "dataset" in done.stderr and "rank 0 failed to prepare the dataset" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
