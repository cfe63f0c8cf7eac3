"""``cog predict`` and ``cog train`` without Docker: run the Predictor or the train function named in
cog.yaml from a shell.

    script/predict -i prompt="lo-fi beat" -i duration=8
    script/predict -i input_audio=@melody.mp3 -i prompt="jazz piano" -o jazz.wav
    script/train -i dataset=@my-music.zip -i caption="in the style of my band" -o trained/

Inputs are given as ``-i name=value`` (``@path`` for a file), converted to the
types ``predict()`` / ``train()`` declare, and unknown names are refused. A prediction's output is
copied to ``output.<ext>`` (or ``-o``) and its path printed, as ``cog predict``
does; a training's files (the trained weights, the loss curve, the samples) are copied into the
folder ``-o`` (default ``trained/``). Both are loaded the way Cog loads them, from cog.yaml's
``predict`` / ``train``.
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

from ..core.settings import PROJECT_ROOT

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_entry(kind: str = "predict", project: Path = PROJECT_ROOT, config_file: str = "cog.yaml") -> tp.Any:
    """The config's ``predict`` (an instance of the Predictor) or ``train`` (the function)."""
    import yaml

    config = yaml.safe_load((project / config_file).read_text())
    file_name, name = config[kind].split(":")
    module_name = Path(file_name).stem
    spec = importlib.util.spec_from_file_location(module_name, project / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    entry = getattr(module, name)
    return entry() if kind == "predict" else entry


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


def train_main(argv: tp.Sequence[str]) -> int:
    """``script/train``."""
    parser = argparse.ArgumentParser(
        prog="script/train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input of train(); @path for a file; repeat for each input",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path.cwd() / "trained",
        help="the folder the trained files are copied into (default: ./trained)",
    )
    args = parser.parse_args(argv)

    from ..core.errors import InputError, SetupError

    train = load_entry("train")
    inputs = parse_inputs(args.input, train)
    try:
        result = asyncio.run(train(**inputs))  # async, as Cog runs it
    except (InputError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result is None:  # one of several processes under torchrun: rank 0 writes the files
        print("training: this process's share is done (rank 0 writes the trained files)")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for name, value in vars(result).items():
        if value is not None:
            target = args.output / Path(value).name
            shutil.copyfile(value, target)
            print(f"{name}: {target}")
    return 0


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="script/predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input of predict(); @path for a file; repeat for each input",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="where to write the result "
        "(default: output.<ext> in the current folder; --stream, --loop: a folder, default ./stream, ./loops)",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--stream",
        action="store_true",
        help="the streaming model (cog.stream.yaml): each chunk is written as it arrives",
    )
    model.add_argument(
        "--loop",
        action="store_true",
        help="the loop model (cog.loop.yaml): one file per loop into a folder (-o, default ./loops)",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never fetch the weights (by default a missing model is fetched from the hub on first use)",
    )
    args = parser.parse_args(argv)

    from ..core.errors import InputError, SetupError
    from ..core.settings import Settings
    from . import first_use

    config = "cog.stream.yaml" if args.stream else "cog.loop.yaml" if args.loop else "cog.yaml"
    predictor = load_entry("predict", config_file=config)
    inputs = parse_inputs(args.input, predictor.predict)
    try:
        settings = Settings.from_env()
        if not args.no_download:
            mbd = bool(inputs.get("multi_band_diffusion")) or settings.mbd == "eager"
            first_use.fetch_if_missing(settings.weights_dir, settings.model, mbd, lambda m: print(m, file=sys.stderr))
        predictor.setup()
        if settings.resolved_device() == "cpu":  # once it is set up: what the request about to run costs
            advice = first_use.cpu_advice(settings.model, first_use.copy_bandwidth())
            if advice:
                print(advice, file=sys.stderr)
    except SetupError as exc:  # a setting, the weights, a trained file, a download: one line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.stream:
        folder = args.output or Path.cwd() / "stream"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for item in predictor.predict(**inputs):  # a sync generator, as coglet streams it
                target = folder / Path(item).name
                shutil.copyfile(item, target)
                print(target, flush=True)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        result = asyncio.run(predictor.predict(**inputs))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.loop:
        folder = args.output or Path.cwd() / "loops"
        folder.mkdir(parents=True, exist_ok=True)
        for item in result:
            target = folder / Path(item).name
            shutil.copyfile(item, target)
            print(target)
        return 0
    result = Path(result)
    target = args.output or Path.cwd() / f"output{result.suffix}"
    shutil.copyfile(result, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
