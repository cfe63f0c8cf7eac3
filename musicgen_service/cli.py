"""``cog predict`` without Docker: run the Predictor named in cog.yaml from a shell.

    script/predict -i prompt="lo-fi beat" -i duration=8
    script/predict -i input_audio=@melody.mp3 -i prompt="jazz piano" -o jazz.wav

Inputs are given as ``-i name=value`` (``@path`` for a file), converted to the
types ``predict()`` declares, and unknown names are refused. The output is
copied to ``output.<ext>`` (or ``-o``) and its path printed, as ``cog predict``
does. The Predictor is loaded the way Cog loads it, from cog.yaml's ``predict``.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import shutil
import sys
import typing as tp
from pathlib import Path

from .settings import PROJECT_ROOT

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_predictor(project: Path = PROJECT_ROOT) -> tp.Any:
    import yaml

    config = yaml.safe_load((project / "cog.yaml").read_text())
    file_name, class_name = config["predict"].split(":")
    spec = importlib.util.spec_from_file_location("predict", project / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["predict"] = module
    spec.loader.exec_module(module)
    return getattr(module, class_name)()


def _base_type(annotation: tp.Any) -> tp.Any:
    """``Optional[X]`` -> X."""
    args = [a for a in tp.get_args(annotation) if a is not type(None)]
    return args[0] if tp.get_origin(annotation) is tp.Union and len(args) == 1 else annotation


def convert(name: str, raw: str, annotation: tp.Any) -> tp.Any:
    kind = _base_type(annotation)
    try:
        if kind is bool:
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError("expected true or false")
            return raw.lower() in _TRUE
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if isinstance(kind, type) and issubclass(kind, Path):
            path = Path(raw[1:] if raw.startswith("@") else raw).expanduser()
            if not path.is_file():
                raise ValueError(f"no such file: {path}")
            return kind(path.resolve())
        return raw
    except ValueError as exc:
        raise SystemExit(f"error: input {name}={raw!r}: {exc}") from None


def parse_inputs(pairs: tp.Sequence[str], predict: tp.Callable[..., tp.Any]) -> tp.Dict[str, tp.Any]:
    params = {n: p for n, p in inspect.signature(predict).parameters.items() if n != "self"}
    hints = tp.get_type_hints(predict)
    inputs: tp.Dict[str, tp.Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: inputs look like -i name=value, got {pair!r}")
        if name not in params:
            raise SystemExit(f"error: unknown input {name!r}; inputs are: {', '.join(params)}")
        inputs[name] = convert(name, raw, hints[name])
    for name, param in params.items():  # defaults, as Cog fills them in
        if name not in inputs:
            default = param.default
            inputs[name] = getattr(default, "default", default)
    return inputs


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="script/predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                        help="an input of predict(); @path for a file; repeat for each input")
    parser.add_argument("-o", "--output", type=Path, help="where to write the result "
                        "(default: output.<ext> in the current folder)")
    args = parser.parse_args(argv)

    from .errors import InputError
    from .settings import SettingsError
    from .weights import WeightsMissingError

    predictor = load_predictor()
    inputs = parse_inputs(args.input, predictor.predict)
    try:
        predictor.setup()
    except (SettingsError, WeightsMissingError) as exc:  # a setting or the weights folder: one line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        result = Path(asyncio.run(predictor.predict(**inputs)))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = args.output or Path.cwd() / f"output{result.suffix}"
    shutil.copyfile(result, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
