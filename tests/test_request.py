"""Every input rule: a bad value fails with a message naming the field and the rule."""

from __future__ import annotations

import pytest

from musicgen_service.core.errors import InputError
from musicgen_service.generation.request import Capabilities, parse_request

CAPS = Capabilities(max_duration=300, card=2048)


def parse(**inputs):
    inputs.setdefault("prompt", "lo-fi beat")
    return parse_request(CAPS, **inputs)


def rejects(field: str, fragment: str, **inputs) -> InputError:
    with pytest.raises(InputError) as info:
        parse(**inputs)
    assert field in info.value.fields, info.value
    assert fragment in str(info.value), info.value
    return info.value


def test_defaults_make_a_text_request():
    req = parse()
    assert req.mode == "text"
    assert (req.duration, req.top_k, req.top_p, req.temperature) == (8, 250, 0.0, 1.0)
    assert (req.classifier_free_guidance, req.output_format, req.normalization_strategy) == (3, "wav", "loudness")
    assert req.seed is None and req.continuation_end is None


def test_prompt_is_stripped_and_required_without_audio():
    assert parse(prompt="  jazz  ").prompt == "jazz"
    rejects("prompt", "describe the music", prompt=None)
    rejects("prompt", "describe the music", prompt="   ")
    rejects("prompt", "at most 2000 characters", prompt="x" * 2001)


@pytest.mark.parametrize("duration", [0, -5, 301])
def test_duration_range(duration):
    rejects("duration", "between 1 and 300 seconds", duration=duration)


def test_duration_bounds_are_inclusive():
    assert parse(duration=1).duration == 1
    assert parse(duration=300).duration == 300


def test_sampling_rules():
    rejects("top_k", "between 0 and 2048", top_k=-1)
    rejects("top_k", "codebook size", top_k=2049)
    rejects("top_p", "between 0 and 1", top_p=-0.1)
    rejects("top_p", "between 0 and 1", top_p=1.5)
    rejects("top_p", "between 0 and 1", top_p=float("nan"))
    rejects("temperature", "greater than 0", temperature=0)
    rejects("temperature", "greater than 0", temperature=-1.0)
    rejects("classifier_free_guidance", ">= 0", classifier_free_guidance=-1)
    assert parse(top_k=0, top_p=1.0, classifier_free_guidance=0).top_p == 1.0


def test_enums():
    rejects("normalization_strategy", "loudness, clip, peak, rms", normalization_strategy="lufs")
    rejects("output_format", "wav, mp3", output_format="flac")


def test_seed_none_and_minus_one_mean_random_and_zero_is_a_seed():
    assert parse(seed=None).seed is None
    assert parse(seed=-1).seed is None
    assert parse(seed=0).seed == 0
    assert parse(seed=2**32 - 1).seed == 2**32 - 1
    rejects("seed", "-1 or None", seed=-2)
    rejects("seed", "4294967295", seed=2**32)


def test_continuation_needs_input_audio():
    rejects("continuation", "needs input_audio", continuation=True)
    rejects("continuation_start", "no input_audio", continuation_start=3)
    rejects("continuation_end", "no input_audio", continuation_end=5)


def test_continuation_window_rules():
    rejects("continuation_start", ">= 0", continuation_start=-1)
    rejects("continuation_end", "greater than continuation_start", continuation_start=5, continuation_end=5)
    rejects("continuation_end", "greater than continuation_start", continuation_start=5, continuation_end=2)
    rejects("continuation_end", "-1 or None", continuation_end=-3)


def test_every_problem_is_reported_at_once():
    error = rejects("duration", "between", prompt="", duration=0, top_p=2.0, output_format="ogg")
    assert error.fields == ["prompt", "duration", "output_format", "top_p"]


def test_audio_modes():
    audio = "/tmp/song.wav"
    assert parse(input_audio=audio).mode == "melody"
    assert parse(input_audio=audio, continuation=True).mode == "continuation"
    assert parse(prompt=None, input_audio=audio).prompt is None  # audio alone is enough
    req = parse(input_audio=audio, continuation=True, continuation_start=2, continuation_end=-1)
    assert (req.continuation_start, req.continuation_end) == (2, None)


def test_melody_needs_a_melody_model():
    caps = Capabilities(max_duration=300, card=2048, melody=False, name="facebook/musicgen-small")
    with pytest.raises(InputError, match="input_audio: facebook/musicgen-small has no melody conditioning"):
        parse_request(caps, prompt="x", input_audio="/tmp/song.wav")
    assert parse_request(caps, prompt="x", input_audio="/tmp/a.wav", continuation=True).mode == "continuation"


# ------------------------------------------------------------------ extremes


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"classifier_free_guidance": 10**400}, "classifier_free_guidance"),  # beyond float range
        ({"classifier_free_guidance": 1001}, "classifier_free_guidance"),
        ({"continuation_start": 10**400, "input_audio": "x.wav", "continuation": True}, "continuation_start"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
    ],
)
def test_extreme_numbers_are_refused_by_rule_not_by_overflow(inputs, field):
    with pytest.raises(InputError) as info:
        parse_request(CAPS, **{"prompt": "x", **inputs})
    assert info.value.fields == [field]


def test_a_temperature_near_zero_is_greedy_and_ordinary_ones_sample():
    assert parse_request(CAPS, prompt="x", temperature=1e-40).greedy
    assert not parse_request(CAPS, prompt="x", temperature=0.01).greedy
    assert not parse_request(CAPS, prompt="x", temperature=1.0).greedy
