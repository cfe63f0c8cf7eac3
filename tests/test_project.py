"""The project's contract files: cog.yaml, pins, and the public input schema of predict.py."""
from __future__ import annotations

import inspect
import json
import typing as tp
from pathlib import Path

import pytest
import yaml

from seed_schema import SEED_DESCRIPTIONS, SEED_INPUTS

ROOT = Path(__file__).resolve().parent.parent
COG_SCHEMA = ROOT / "tests" / "data" / "cog_config_schema_v1.0.json"

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
