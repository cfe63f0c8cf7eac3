"""`cog build`'s steps for this project, reproduced as closely as a machine without Docker allows.

The Dockerfile Cog 0.23 generates for cog.yaml (replicate/cog pkg/dockerfile/standard_generator.go,
``GenerateInitialSteps``; docs/docker-and-replicate.md lists the facts), and what this test does:

1. Python 3.11 installed by ``uv python install``: not a virtualenv, marked externally managed
   (PEP 668), ``python``/``python3`` on PATH, no ``pip`` there. Here: a fresh Python 3.11 prefix
   on this machine's interpreter (not a venv, which pip exempts from PEP 668), pip from
   ``ensurepip``, uv's EXTERNALLY-MANAGED marker; checked to refuse a plain ``pip install``.
2. requirements.txt as Cog rewrites it, installed by
   ``uv run pip install --break-system-packages --cache-dir /root/.cache/pip -r requirements.txt``.
   Here: the same command and flags, with uv from PyPI at the version Cog copies in, and pip's
   cache folder of this user (for root, the very path Cog's flag names: a CI machine reuses the
   wheels ``script/bootstrap`` fetched). Cog's first line, ``--extra-index-url`` to PyTorch's cu130
   index, is left out: PyPI's torch 2.11.0 wheels are used instead (built for CUDA 13.0 as well).
3. The SDK: ``uv pip install --break-system-packages --no-cache cog==<build.sdk_version>``. Same.
4. cog.yaml's ``build.run`` lines, read from cog.yaml, each as written through ``/bin/sh -c`` as
   RUN does, with ``python`` first on PATH, Cog's ``UV_SYSTEM_PYTHON``/``UV_PYTHON`` and cog.yaml's
   ``environment``, in an empty folder (the source is not in the image yet at that point).
5. ``COPY . /src`` less ``.cog/`` and ``.dockerignore``; Cog's server imports predict.py from
   /src. Here: the files git knows, less those, copied to a src/ folder, and one prediction with
   ``script/predict``'s runner from there, on the tiny weights, on CPU.

Not reproduced: the CUDA base image (``r8.im/cog-base:cuda13.0-python3.11-torch2.11.0`` or
``nvidia/cuda:13.0.3-cudnn-devel-ubuntu24.04``), a GPU, the cu130 index, uv's own Python build and
its pip version, apt, Docker's COPY (symlinks in weights/), the static schema step (modelled in
test_project.py) and the coglet server inside the image (test_server.py runs it here).

One run: about 3 minutes and 6 GB of disk (~1.5 minutes of it installing requirements.txt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import typing as tp
from pathlib import Path

import cog_image
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.image_build, pytest.mark.slow]


def managed_python(prefix: Path) -> Path:
    """A new Python installation at ``prefix`` (not a venv) on the interpreter running the tests:
    its own copy of the executable, the standard library linked in, an empty site-packages, pip
    from ensurepip, then uv's EXTERNALLY-MANAGED marker. Returns its executable."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_path("stdlib"))  # the base installation's, also from inside a venv
    lib = prefix / "lib" / version
    (lib / "site-packages").mkdir(parents=True)
    (prefix / "bin").mkdir()
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    exe = prefix / "bin" / version
    shutil.copy2(os.path.realpath(sys._base_executable), exe)  # type: ignore[attr-defined]
    run([str(exe), "-m", "ensurepip", "--default-pip"], env=clean_env())
    (lib / "EXTERNALLY-MANAGED").write_text(cog_image.UV_EXTERNALLY_MANAGED)
    return exe


def clean_env(**extra: str) -> tp.Dict[str, str]:
    """This machine's environment (its registry and certificate settings) without what would make
    a build here differ from one in the image: virtualenv, Python paths, PEP 668 overrides."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_BREAK_SYSTEM_PACKAGES", "PIP_REQUIRE_VIRTUALENV")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("UV_", "MUSICGEN_", "HF_", "TRANSFORMERS_"))
    }
    env.update(PYTHONNOUSERSITE="1", **extra)
    return env


def run(
    cmd: tp.Sequence[str],
    env: tp.Mapping[str, str],
    cwd: tp.Optional[Path] = None,
    timeout: int = 900,
    check: bool = True,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_cog_build_steps_install_and_predict(tmp_path: Path, tiny_weights: Path):
    config = cog_image.cog_config(ROOT)
    build = config["build"]
    assert str(build["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"

    # 1. the interpreter, and the image's PATH: `python` (and uv) first, then the system's tools
    #    less this machine's own Python and pip (the image has neither)
    python = managed_python(tmp_path / "python")
    bin_dir, system_bin = tmp_path / "usr-local-bin", tmp_path / "usr-bin"
    bin_dir.mkdir()
    system_bin.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if not tool.name.startswith(("pip", "python")):
            (system_bin / tool.name).symlink_to(tool)
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(python)
    (system_bin / "python3").symlink_to(python)  # Cog links /usr/bin/python3 to uv's Python
    tools = tmp_path / "uv"
    run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tools), f"uv=={cog_image.COG_UV_VERSION}"],
        env=clean_env(),
    )
    (bin_dir / "uv").symlink_to(tools / "bin" / "uv")
    image_env = clean_env(
        PATH=f"{bin_dir}:/usr/sbin:{system_bin}:/sbin",
        UV_SYSTEM_PYTHON="true",
        UV_PYTHON=str(python),
        UV_PYTHON_DOWNLOADS="never",
        **dict(e.split("=", 1) for e in config.get("environment") or []),
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run(["python", "-m", "pip", "install", "--no-deps", "six"], env=image_env, cwd=empty, check=False)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr, refused.stderr

    # 2. requirements.txt, the way Cog installs it
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(cog_image.cog_requirements(ROOT / build["python_requirements"])))
    pip_cache = Path.home() / ".cache" / "pip"
    run(
        [
            "uv",
            "run",
            "pip",
            "install",
            "--break-system-packages",
            "--cache-dir",
            str(pip_cache),
            "-r",
            str(requirements),
        ],
        env=image_env,
        cwd=empty,
        timeout=1800,
    )

    # 3. the Cog SDK at build.sdk_version
    run(
        ["uv", "pip", "install", "--break-system-packages", "--no-cache", f"cog=={build['sdk_version']}"],
        env=image_env,
        cwd=empty,
    )

    # 4. cog.yaml's run: lines, as written
    lines = cog_image.run_lines(config)
    assert lines, "cog.yaml has no build.run line"
    for line in lines:
        run(["/bin/sh", "-c", line], env=image_env, cwd=empty)

    # 5. /src, and a prediction from there
    src = tmp_path / "src"
    for name in cog_image.build_context(ROOT):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    versions = run(
        [
            "python",
            "-c",
            "import importlib.metadata as m; "
            "print(*(m.version(p) for p in ('cog', 'coglet', 'torch', 'audiocraft', 'xformers')))",
        ],
        env=image_env,
        cwd=src,
    ).stdout.split()
    assert versions == [str(build["sdk_version"])] * 2 + ["2.11.0", "1.3.0", "0.0.35"], versions
    out = tmp_path / "out.wav"
    predicted = run(
        [
            "python",
            "-m",
            "musicgen_service.tools.cli",
            "-i",
            "prompt=lo-fi beat",
            "-i",
            "duration=1",
            "-i",
            "seed=1",
            "-o",
            str(out),
        ],
        env={**image_env, "MUSICGEN_WEIGHTS": str(tiny_weights), "MUSICGEN_DEVICE": "cpu"},
        cwd=src,
    )
    assert predicted.stdout.split()[-1] == str(out), predicted.stdout  # the path, after the logs
    import soundfile

    audio, rate = soundfile.read(out)
    assert rate == 32000 and audio.shape == (32000, 2)
