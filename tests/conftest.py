"""Shared fixtures: one tiny random model set per test session, in the real on-disk formats.

The hub libraries read their cache location when first imported, so the weights folder is
chosen and configured here, before any test module imports them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

import pytest

TINY_DIR = Path(tempfile.mkdtemp(prefix="musicgen-tiny-weights-"))
os.environ["MUSICGEN_WEIGHTS"] = str(TINY_DIR)
os.environ.pop("MUSICGEN_MODEL", None)
os.environ.setdefault("MUSICGEN_DEVICE", "cpu")

from musicgen_service.weights import hub as weights  # noqa: E402

weights.use_hub_cache(TINY_DIR)

STEREO_MELODY = "facebook/musicgen-stereo-melody-large"
MONO_MELODY = "facebook/musicgen-melody"
MONO_TEXT = "facebook/musicgen-small"


@pytest.fixture(scope="session")
def tiny_weights() -> tp.Iterator[Path]:
    from musicgen_service.tools import tiny

    tiny.write_tiny_set(TINY_DIR)
    yield TINY_DIR
    shutil.rmtree(TINY_DIR, ignore_errors=True)


def make_service(weights_dir: Path, model: str = STEREO_MELODY, **settings: tp.Any) -> tp.Any:
    from musicgen_service.core.settings import Settings
    from musicgen_service.serving.service import Service

    return Service(Settings(weights_dir=weights_dir, model=model, device="cpu", **settings))


@pytest.fixture(scope="session")
def service(tiny_weights: Path) -> tp.Any:
    """The default model (stereo, melody) on the tiny set."""
    return make_service(tiny_weights)


@pytest.fixture(scope="session")
def mono_service(tiny_weights: Path) -> tp.Any:
    """A mono text-only model on the tiny set."""
    return make_service(tiny_weights, MONO_TEXT)
