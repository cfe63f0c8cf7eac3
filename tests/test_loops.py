"""The loop model: the beat tracker and the loop cutter on synthetic rhythm at known tempi, the loop
request's rules, the negative prompt in every decoding path, and the loop service end to end on the
tiny set (whose audio is noise: the no-tempo path runs there)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import MONO_TEXT, STEREO_MELODY
from rhythm import signal

from musicgen_service.audio import beats, looping
from musicgen_service.core.errors import Cancelled, InputError
from musicgen_service.generation.request import Capabilities, parse_loop_request

RATE = 32000
CAPS = Capabilities(max_duration=300, card=2048)


def downbeat_error(found: beats.Beats, offset: float, bar: float) -> float:
    """Seconds between the found grid's downbeats and the true ones (every ``bar`` from ``offset``)."""
    first = found.time(found.downbeat)
    return abs(((first - offset + bar / 2) % bar) - bar / 2)


# ------------------------------------------------------------------------------------------ tracking


@pytest.mark.parametrize("kind", ["click", "drums", "swing", "music"])
@pytest.mark.parametrize("beats_per_bar", [3, 4])
@pytest.mark.parametrize("bpm", [60, 97, 120, 150, 180])
def test_the_tracker_finds_the_tempo_and_the_bars(kind, beats_per_bar, bpm):
    offset = 0.43
    wav = signal(kind, bpm, beats_per_bar, seconds=12, offset=offset, channels=2 if bpm == 120 else 1)
    found = beats.track(wav, RATE, bpm * 1.05, beats_per_bar)  # asked 5% off: the music's own tempo wins
    assert found is not None
    assert abs(found.bpm / bpm - 1) < 0.005, found
    assert downbeat_error(found, offset, beats_per_bar * 60 / bpm) < 0.015, found


@pytest.mark.parametrize("seed", range(4))
def test_noise_has_no_tempo(seed):
    assert beats.track(signal("noise", 120, seed=seed), RATE, 120, 4) is None
    assert beats.track(np.zeros((2, RATE * 4), np.float32), RATE, 120, 4) is None


# ------------------------------------------------------------------------------------------ cutting


def seam_step(wav: np.ndarray) -> float:
    return float(np.abs(wav[:, 0] - wav[:, -1]).max())


@pytest.mark.parametrize(
    "kind, played, asked, beats_per_bar, bars, channels",
    [
        ("drums", 110, 120, 4, 4, 1),
        ("drums", 128, 120, 3, 2, 2),
        ("music", 95, 90, 4, 2, 1),
        ("music", 62, 60, 4, 1, 2),
        ("click", 170, 180, 4, 8, 1),
        ("swing", 100, 100, 3, 4, 2),
    ],
)
def test_a_loop_is_exact_starts_on_the_downbeat_and_wraps_without_a_step(
    kind, played, asked, beats_per_bar, bars, channels
):
    """Music played 5-8% off the tempo asked for: the loop is the exact length at the asked tempo, cut
    on one of the music's true downbeats, which lands at sample 0; repeated, it keeps the asked tempo
    within 1% with a beat at every repeat's start; the step at the wrap is one the loop makes anyway.
    (The bars are checked in the music before the stretch: Rubber Band softens a kick's low sweep
    enough that the loudest-kick heuristic is not a fair judge of the stretched audio.)"""
    offset = 0.61
    seconds = looping.generation_seconds(asked, bars, beats_per_bar) + 1
    wav = signal(kind, played, beats_per_bar, seconds=seconds, offset=offset, channels=channels)
    found = beats.track(wav, RATE, asked, beats_per_bar)
    loop = looping.cut(wav, RATE, found, asked, bars)
    assert loop is not None
    assert loop.wav.shape == (channels, looping.loop_samples(asked, bars, beats_per_bar, RATE))
    assert loop.wav.dtype == np.float32
    assert abs(loop.found_bpm / played - 1) < 0.005
    bar = beats_per_bar * 60 / played
    assert abs(((loop.start - offset + bar / 2) % bar) - bar / 2) < 0.015, loop.start  # cut on a true downbeat
    repeated = np.concatenate([loop.wav] * 3, axis=1)
    again = beats.track(repeated, RATE, asked, beats_per_bar)
    assert abs(again.bpm / asked - 1) < 0.01, again
    assert downbeat_error(again, 0.0, again.period) < 0.015, again  # ... that lands on a beat at sample 0
    steps = np.abs(np.diff(loop.wav, axis=1))
    assert seam_step(loop.wav) <= np.percentile(steps, 99.9), (seam_step(loop.wav), np.percentile(steps, 99.9))


def test_the_seam_continues_the_waveform_with_equal_power():
    """What followed the span is the natural continuation of its last sample: the crossfade starts
    there, so the wrap is as smooth as the signal; uncorrelated halves keep their power through it."""
    length, seam = 4000, looping.seam_samples(RATE)
    t = np.arange(length + seam) / RATE
    piece = np.sin(2 * np.pi * 220 * t)[None].astype(np.float32)
    loop = looping.seamed(piece, length)
    assert loop.shape == (1, length)
    natural = np.abs(np.diff(piece[0])).max()
    assert seam_step(loop) <= natural * 1.01
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 200_000 + seam)).astype(np.float32)
    faded = looping.seamed(noise, 200_000)[:, :seam]
    assert 0.8 < float(np.mean(faded**2)) < 1.2  # equal power: no dip in the middle


def test_without_a_tempo_the_exact_length_is_cut_and_seamed():
    wav = signal("noise", 120, seconds=6, channels=2)
    loop = looping.fallback(wav, RATE, 120, 2, 4, earliest=1.0)
    assert loop.wav.shape == (2, looping.loop_samples(120, 2, 4, RATE))
    assert loop.start == 1.0 and loop.found_bpm is None
    short = looping.fallback(wav[:, : RATE * 2], RATE, 120, 2, 4, earliest=0.0)  # padded, never short
    assert short.wav.shape[-1] == looping.loop_samples(120, 2, 4, RATE)


@pytest.mark.parametrize("bpm, bars, beats_per_bar", [(40, 1, 2), (97.5, 4, 4), (300, 16, 12), (61, 2, 7)])
def test_lengths_are_exact_to_the_sample_and_generation_covers_slower_music(bpm, bars, beats_per_bar):
    assert looping.loop_samples(bpm, bars, beats_per_bar, RATE) == round(bars * beats_per_bar * 60 / bpm * RATE)
    seconds = looping.generation_seconds(bpm, bars, beats_per_bar)
    played = bpm / looping.GENERATION_MARGIN * 1.01  # as slow as the margin allows
    wav = signal("drums", played, beats_per_bar, seconds=seconds, offset=0.9 * beats_per_bar * 60 / played)
    found = beats.track(wav, RATE, bpm, beats_per_bar)
    assert found is not None and looping.cut(wav, RATE, found, bpm, bars) is not None


# ------------------------------------------------------------------------------------------ the request


@pytest.mark.parametrize(
    "inputs, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="x" * 3000), "prompt"),
        (dict(negative_prompt="x" * 3000), "negative_prompt"),
        (dict(bpm=39.9), "bpm"),
        (dict(bpm=float("nan")), "bpm"),
        (dict(bpm=301), "bpm"),
        (dict(bars=3), "bars"),
        (dict(beats_per_bar=1), "beats_per_bar"),
        (dict(beats_per_bar=13), "beats_per_bar"),
        (dict(variations=0), "variations"),
        (dict(variations=9), "variations"),
        (dict(top_k=5000), "top_k"),
        (dict(temperature=0), "temperature"),
        (dict(output_format="flac"), "output_format"),
        (dict(seed=-5), "seed"),
        (dict(bpm=40, bars=16, beats_per_bar=12), "bars"),  # 288 s of loop: past 300 s to generate
    ],
)
def test_every_loop_rule_names_its_field(inputs, field):
    with pytest.raises(InputError) as info:
        parse_loop_request(CAPS, **{"prompt": "funk drums", **inputs})
    assert [f for f, _ in info.value.problems] == [field], info.value


def test_a_negative_prompt_is_refused_where_the_decoder_cannot_take_it():
    caps = Capabilities(max_duration=300, card=2048, negative_unavailable="stock audiocraft")
    with pytest.raises(InputError, match="negative_prompt"):
        parse_loop_request(caps, prompt="x", negative_prompt="vocals")
    assert parse_loop_request(caps, prompt="x", negative_prompt="  ").negative_prompt is None


def test_the_loops_generation_request_names_the_tempo():
    request = parse_loop_request(CAPS, prompt=" funk drums ", bpm=97.5, negative_prompt="vocals", seed=4)
    generation = request.generation(9, seed=11)
    assert generation.prompt == "funk drums, 97.5 bpm"
    assert (generation.duration, generation.seed, generation.negative_prompt) == (9, 11, "vocals")
    assert generation.mode == "text" and generation.normalization_strategy == "loudness"


# ------------------------------------------------------------------------------------------ negative prompt


@pytest.fixture(scope="module")
def decoders(tiny_weights):
    """Services on the tiny mono model, one per decoding path: the dynamic loop in exact and int8,
    the static steps (what CUDA graphs replay, run eagerly) and rows sharing steps (the scheduler)."""
    from conftest import make_service

    from musicgen_service.decoding import Decoder

    out = {}
    for mode in ("exact", "int8"):
        out[mode] = make_service(tiny_weights, MONO_TEXT, decoder=mode, prepared_off=True)
    static = make_service(tiny_weights, MONO_TEXT, decoder="exact", prepared_off=True)
    static.generator.decoder = Decoder(static.model.lm, "exact", static_steps=True)
    out["static"] = static
    out["rows"] = make_service(tiny_weights, MONO_TEXT, decoder="int8", prepared_off=True, concurrency=2)
    return out


def negative_request(service, negative):
    from dataclasses import replace

    return replace(service.parse(prompt="calm piano", duration=1, seed=7), negative_prompt=negative)


@pytest.mark.parametrize("path", ["exact", "int8", "static", "rows"])
def test_a_negative_prompt_changes_the_tokens_and_an_empty_one_changes_nothing(decoders, path):
    service = decoders[path]

    def tokens(negative):
        request = negative_request(service, negative)
        if path == "rows":  # through the scheduler, as concurrent requests decode
            assert service.scheduler.batching
            conditioned = service.compute.call(service._condition, request, True)
            return service.scheduler.submit(conditioned).result(timeout=120)
        return service.compute.call(service._tokens_alone, request, None)

    plain = tokens(None)
    assert torch.equal(tokens(""), plain)  # empty is absent, bit for bit
    assert torch.equal(tokens(None), plain)  # (and the seed reproduces)
    assert not torch.equal(tokens("loud drums"), plain)


def test_stock_decoding_says_it_cannot_take_a_negative_prompt(tiny_weights):
    from conftest import make_service

    service = make_service(tiny_weights, MONO_TEXT, decoder="stock", prepared_off=True)
    assert "stock audiocraft" in service.capabilities.negative_unavailable


# ------------------------------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def loops(tiny_weights):
    """The loop model on the tiny stereo set, in a precision whose rows share steps (int8)."""
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.loops import LoopService

    return LoopService(
        Settings(weights_dir=tiny_weights, model=STEREO_MELODY, device="cpu", decoder="int8", prepared_off=True)
    )


def test_loops_are_exact_stereo_named_and_reproducible(loops):
    import soundfile

    inputs = dict(prompt="funk drums", bpm=97.5, bars=1, beats_per_bar=3, variations=3, seed=21)
    paths = loops.predict(**inputs, negative_prompt="vocals")
    assert [p.name for p in paths] == [f"loop-{i}-97.5bpm.wav" for i in range(3)]
    assert len({p.parent for p in paths}) == 1 and not (paths[0].parent / "prompt.wav").exists()
    for p in paths:
        wav, rate = soundfile.read(str(p), always_2d=True)
        assert rate == RATE and wav.shape == (looping.loop_samples(97.5, 1, 3, RATE), 2)
    # noise has no tempo: each loop tried TRIES seeds, then cut at the asked tempo (never a failure)
    assert [m.index for m in loops.report.loops] == [0, 1, 2]
    assert all(m.found_bpm is None and m.tries == 2 for m in loops.report.loops)
    # the variations were rows of one batch: the scheduler took steps of two rows
    assert max(loops.service.scheduler.batch_sizes) >= 2
    again = loops.predict(**inputs, negative_prompt="vocals")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_one_loop_mp3_and_a_melody(loops, tmp_path):
    from audio_helpers import melody, write

    tune = write(tmp_path / "tune.wav", melody([262, 392], 0.5, 44100, 1), 44100)
    paths = loops.predict(prompt="organ", bpm=150, bars=2, variations=1, input_audio=tune, output_format="mp3", seed=3)
    assert [p.name for p in paths] == ["loop-0-150bpm.mp3"]
    assert paths[0].stat().st_size > 1000


def test_a_cancelled_loop_request_stops_and_leaves_nothing(loops):
    import glob
    import os
    import tempfile

    from musicgen_service.core import folders

    def ours():
        return set(glob.glob(os.path.join(tempfile.gettempdir(), f"{folders.PREFIX}{os.getpid()}-*")))

    before = ours()
    cancel = threading.Event()
    request = loops.parse(prompt="ambient", bpm=60, bars=4, variations=4, seed=1)
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    with pytest.raises(Cancelled):
        loops.run(request, cancel)
    timer.cancel()
    assert ours() <= before


def test_script_prepare_loop_fills_what_the_loop_models_setup_reads(tiny_weights, tmp_path, monkeypatch):
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.loops import LoopService
    from musicgen_service.tools import prepare

    env = {"MUSICGEN_WEIGHTS": str(tiny_weights), "MUSICGEN_MODEL": MONO_TEXT, "MUSICGEN_DECODER": "int8"}
    for name, value in {**env, "MUSICGEN_PREPARED": str(tmp_path), "COG_MAX_CONCURRENCY": "1"}.items():
        monkeypatch.setenv(name, value)
    assert prepare.main(["--loop"]) == 0
    service = LoopService(Settings.from_env()).service
    assert service.generator.decoder.prepared is not None  # read, not measured again
    assert service.scheduler.slots == 4
