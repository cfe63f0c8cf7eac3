"""The project's contract files: cog.yaml, pins, and the public input schema of predict.py."""

from __future__ import annotations

import ast
import inspect
import io
import json
import tokenize
import typing as tp
from pathlib import Path

import cog_image
import pytest
import yaml
from seed_schema import SEED_DESCRIPTIONS, SEED_INPUTS

ROOT = Path(__file__).resolve().parent.parent
COG_SCHEMA = ROOT / "tests" / "data" / "cog_config_schema_v1.0.json"


def _cog_schema() -> tp.Dict[str, tp.Any]:
    """The cog.yaml schema copied here, plus ``build.sdk_version``: the copy predates it, Cog's own
    (pkg/config/data/config_schema_v1.0.json) has it since 0.18."""
    schema = json.loads(COG_SCHEMA.read_text())
    schema["properties"]["build"]["properties"]["sdk_version"] = {"type": "string"}
    return schema


def test_cog_yaml_is_valid_for_cog():
    import jsonschema

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, _cog_schema())
    assert config["predict"] == "predict.py:Predictor"
    assert config["build"]["gpu"] is True
    assert str(config["build"]["python_version"]) == "3.11"
    assert config["build"]["python_requirements"] == "requirements.txt"


def test_cog_schema_rejects_a_broken_config():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"build": {"gpu": "yes", "python_packagez": []}}, _cog_schema())


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


def test_cog_yaml_run_installs_the_way_cogs_python_allows():
    """A `run:` line is a bare RUN (replicate/cog pkg/dockerfile/standard_generator.go runCommands):
    it gets none of the flags Cog gives its own installs, its Python is uv-managed and externally
    managed (PEP 668), and only `python` is on PATH. test_image_build.py runs the line itself."""
    for line in cog_image.run_lines(cog_image.cog_config(ROOT)):
        if "pip install" in line:
            assert line.startswith("python -m pip install "), line
            assert "--break-system-packages" in line.split(), line
            assert "--no-cache-dir" in line.split(), line  # no pip cache left in the image


def test_cog_sdk_in_the_image_is_the_one_tested():
    sdk = str(cog_image.cog_config(ROOT)["build"]["sdk_version"])
    assert f"cog=={sdk}" in _requirements("requirements-dev.txt")
    assert not any(r.startswith(("cog==", "coglet==")) for r in _requirements("requirements.txt"))


def test_dockerignore_keeps_the_model_and_leaves_out_local_state():
    patterns = cog_image.dockerignore_patterns(ROOT)
    for kept in (
        "predict.py",
        "cog.yaml",
        "requirements.txt",
        "musicgen_service/serving/service.py",
        "weights/README.md",
        "weights/models--t5-base/blobs/0123abcd",
        "weights/models--t5-base/snapshots/f00d/config.json",
        "bench/results/cpu.md",
    ):
        assert not cog_image.dockerignored(kept, patterns), kept
    for dropped in (
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-schema/bin/python",
        ".gpu/site.tar.xz",
        "bench/work/models--facebook--musicgen-small/blobs/0123abcd",
        "musicgen_service/serving/__pycache__/service.cpython-311.pyc",
        ".pytest_cache/README.md",
        "output.wav",
        "output-2.mp3",
    ):
        assert cog_image.dockerignored(dropped, patterns), dropped
    context = cog_image.build_context(ROOT)
    assert "predict.py" in context and "musicgen_service/weights/hub.py" in context
    assert not any(f.startswith((".cog/", ".venv/", ".git/")) for f in context)


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


def _classes() -> tp.Dict[str, ast.ClassDef]:
    tree = ast.parse((ROOT / "predict.py").read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _calls_in(cls: ast.ClassDef) -> tp.Dict[str, ast.Call]:
    """A class body's ``name = Input(...)`` assignments, by name."""
    return {
        t.targets[0].id: t.value
        for t in cls.body
        if isinstance(t, ast.Assign) and isinstance(t.value, ast.Call) and getattr(t.value.func, "id", None) == "Input"
    }


def _input_calls() -> tp.Dict[str, ast.Call]:
    """The ``Input(...)`` calls of predict.py's ``Inputs`` class, by name, as the parser sees them; and
    both predictors take them as ``Inputs.<name>``, in the seed's order (Cog's static parser resolves
    such references within the file: its input registry, pkg/schema/python/inputs.go)."""
    classes = _classes()
    calls = _calls_in(classes["Inputs"])
    for name in ("Predictor", "StreamingPredictor"):
        predict = next(
            n
            for n in classes[name].body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "predict"
        )
        params = predict.args.args[len(predict.args.args) - len(predict.args.defaults) :]
        refs = [(a.arg, ast.unparse(d)) for a, d in zip(params, predict.args.defaults)]
        assert refs == [(n, f"Inputs.{n}") for n in calls], name
    return calls


def test_predict_inputs_are_literals_that_cogs_static_schema_parser_reads():
    """`cog build` (Cog >= 0.23) makes the image's OpenAPI schema by parsing predict.py, not by running
    it (replicate/cog pkg/schema/python/inputs.go parseInputCall, literals.go): ``choices`` must be a
    list literal (an imported name or ``list(X)`` fails the build), ``ge``/``le`` number literals
    (anything else is dropped without a word), a description one string literal (implicitly joined
    literals are copied with the quotes and whitespace between them) and a default a literal.
    This checks those rules with Python's own parser; it is a model of Cog's, not Cog's."""
    calls = _input_calls()
    assert list(calls) == [name for name, *_ in SEED_INPUTS]
    _check_literals(calls)


def _check_literals(calls: tp.Dict[str, ast.Call]) -> None:
    source = (ROOT / "predict.py").read_text()
    for name, call in calls.items():
        for kw in call.keywords:
            text = ast.get_source_segment(source, kw.value)
            where = f"{name}: {kw.arg}={text}"
            if kw.arg == "description":
                tokens = [
                    t
                    for t in tokenize.generate_tokens(io.StringIO(text).readline)
                    if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
                ]
                assert len(tokens) == 1 and tokens[0].type == tokenize.STRING, where
                assert text[0] in "\"'" and "\\" not in text, where
            elif kw.arg == "choices":
                assert isinstance(kw.value, ast.List), where
                assert all(isinstance(e, ast.Constant) for e in kw.value.elts), where
            elif kw.arg in ("ge", "le"):
                float(text)  # Cog parses the text itself as a number
            elif kw.arg == "default":
                ast.literal_eval(kw.value)
            else:
                raise AssertionError(f"{where}: not checked against Cog's static parser")


LOOP_INPUTS = ["prompt", "negative_prompt", "bpm", "bars", "beats_per_bar", "variations", "input_audio"]
LOOP_SHARED = ["top_k", "top_p", "temperature", "classifier_free_guidance", "output_format", "seed"]


def test_the_loop_models_inputs_are_literals_and_share_the_main_models():
    """The loop model's own inputs (LoopInputs) follow the same literal rules; the shared ones are the
    main model's ``Inputs.<name>``, in the order the issue names them."""
    classes = _classes()
    calls = _calls_in(classes["LoopInputs"])
    assert list(calls) == LOOP_INPUTS
    _check_literals(calls)
    predict = next(
        n
        for n in classes["LoopPredictor"].body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "predict"
    )
    params = predict.args.args[1:]
    defaults = [None] * (len(params) - len(predict.args.defaults)) + list(predict.args.defaults)
    refs = [(a.arg, ast.unparse(d)) for a, d in zip(params, defaults)]
    assert refs == [(n, f"LoopInputs.{n}") for n in LOOP_INPUTS] + [(n, f"Inputs.{n}") for n in LOOP_SHARED]


def test_loop_literals_are_the_loop_request_rules():
    import predict
    from musicgen_service.generation import request as rules

    def field(name):
        return getattr(predict.LoopInputs, name)

    assert (field("bpm").ge, field("bpm").le) == rules.BPM_RANGE
    assert field("bars").choices == list(rules.BARS)
    assert (field("beats_per_bar").ge, field("beats_per_bar").le) == rules.BEATS_PER_BAR_RANGE
    assert (field("variations").ge, field("variations").le) == rules.VARIATIONS_RANGE
    caps = rules.Capabilities(max_duration=300, card=2048)
    defaults = {n: field(n).default for n in LOOP_INPUTS if field(n).default is not None}
    assert "prompt" not in defaults  # required
    request = rules.parse_loop_request(caps, prompt="x", **defaults)
    assert (request.bpm, request.bars, request.beats_per_bar, request.variations) == (120.0, 4, 4, 4)
    assert request.negative_prompt is None


def test_predict_literals_are_the_request_rules():
    from musicgen_service.generation.request import MAX_SEED, NORMALIZATION_STRATEGIES, OUTPUT_FORMATS

    fields = {name: field for name, _, field in _predict_inputs()}
    assert fields["normalization_strategy"].choices == list(NORMALIZATION_STRATEGIES)
    assert fields["output_format"].choices == list(OUTPUT_FORMATS)
    assert fields["seed"].le == MAX_SEED
