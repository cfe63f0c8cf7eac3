"""The project's contract files: cog.yaml, pins, and the public input schema of predict.py."""
from __future__ import annotations

import inspect
import json
import typing as tp
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COG_SCHEMA = ROOT / "tests" / "data" / "cog_config_schema_v1.0.json"

# The model page's input schema (../shared/seed/model-page.txt): name, type, default, enum.
SEED_INPUTS = [
    ("prompt", str, None, None),
    ("input_audio", Path, None, None),
    ("duration", int, 8, None),
    ("continuation", bool, False, None),
    ("continuation_start", int, 0, None),
    ("continuation_end", int, None, None),
    ("multi_band_diffusion", bool, False, None),
    ("normalization_strategy", str, "loudness", ["loudness", "clip", "peak", "rms"]),
    ("top_k", int, 250, None),
    ("top_p", float, 0.0, None),
    ("temperature", float, 1.0, None),
    ("classifier_free_guidance", int, 3, None),
    ("output_format", str, "wav", ["wav", "mp3"]),
    ("seed", int, None, None),
]
SEED_DESCRIPTIONS = {
    "prompt": "A description of the music you want to generate.",
    "input_audio": "An audio file that will influence the generated music. If `continuation` is `True`, "
                   "the generated music will be a continuation of the audio file. Otherwise, the generated "
                   "music will mimic the audio file's melody.",
    "duration": "Duration of the generated audio in seconds.",
    "continuation": "If `True`, generated music will continue `melody`. Otherwise, generated music will "
                    "mimic `audio_input`'s melody.",
    "continuation_start": "Start time of the audio file to use for continuation.",
    "continuation_end": "End time of the audio file to use for continuation. If -1 or None, will default "
                        "to the end of the audio clip.",
    "multi_band_diffusion": "If `True`, the EnCodec tokens will be decoded with MultiBand Diffusion. "
                            "Only works with non-stereo models.",
    "normalization_strategy": "Strategy for normalizing audio.",
    "top_k": "Reduces sampling to the k most likely tokens.",
    "top_p": "Reduces sampling to tokens with cumulative probability of p. When set to `0` (default), "
             "top_k sampling is used.",
    "temperature": "Controls the 'conservativeness' of the sampling process. Higher temperature means "
                   "more diversity.",
    "classifier_free_guidance": "Increases the influence of inputs on the output. Higher values produce "
                                "lower-varience outputs that adhere more closely to inputs.",
    "output_format": "Output format for generated audio.",
    "seed": "Seed for random number generator. If None or -1, a random seed will be used.",
}


def test_cog_yaml_is_valid_for_cog():
    import jsonschema

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads(COG_SCHEMA.read_text()))
    assert config["predict"] == "predict.py:Predictor"
    assert config["build"]["gpu"] is True
    assert str(config["build"]["python_version"]) == "3.11"
    assert config["build"]["python_requirements"] == "requirements.txt"


def test_cog_schema_rejects_a_broken_config():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"build": {"gpu": "yes", "python_packagez": []}},
                            json.loads(COG_SCHEMA.read_text()))


def _requirements(name: str) -> tp.List[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


def test_requirements_are_pinned_and_nodeps_match_cog_yaml():
    for name in ("requirements.txt", "requirements-nodeps.txt", "requirements-dev.txt"):
        for req in _requirements(name):
            assert "==" in req, f"{name}: {req} is not pinned"
    runtime = _requirements("requirements.txt")
    assert "torch==2.11.0" in runtime and "torchaudio==2.11.0" in runtime
    run = " ".join(yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["run"])
    for req in _requirements("requirements-nodeps.txt"):
        assert req in run, f"cog.yaml run does not install {req}"
    assert "--no-deps" in run


def _predict_inputs() -> tp.List[tp.Tuple[str, tp.Any, tp.Any]]:
    from predict import Predictor

    hints = tp.get_type_hints(Predictor.predict)
    params = [p for p in inspect.signature(Predictor.predict).parameters.values() if p.name != "self"]
    return [(p.name, hints[p.name], p.default) for p in params]


def test_predict_has_the_seed_schema():
    import cog

    inputs = _predict_inputs()
    assert [name for name, _, _ in inputs] == [name for name, *_ in SEED_INPUTS]
    for (name, hint, field), (_, kind, default, choices) in zip(inputs, SEED_INPUTS):
        base = [a for a in tp.get_args(hint) if a is not type(None)] or [hint]
        assert base[0] is (cog.Path if kind is Path else kind), name
        assert field.default == default, name
        assert field.choices == choices, name
        assert field.description == SEED_DESCRIPTIONS[name], name
    assert tp.get_type_hints(__import__("predict").Predictor.predict)["return"] is cog.Path
