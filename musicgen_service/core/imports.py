"""What setup imports, and what it defers: modules that audiocraft and transformers import at module
level for features a MusicGen prediction never uses, loaded on first use instead (or never).

``import audiocraft.models`` pulls in, besides what MusicGen needs (torch, transformers' T5,
demucs, librosa's chroma filters), these (import times without them, AMD EPYC with AVX2, 2 cores):

| module | imported by | used for |
|---|---|---|
| ``spacy`` (0.6-0.8 s) | ``audiocraft.modules.conditioners`` | the LUT conditioner's noun splitter (no released MusicGen) |
| ``dora`` (0.3 s) | ``audiocraft.data.audio_dataset``, ``flashy.distrib`` | experiment folders of audiocraft's training solvers |
| ``xformers`` (0.2-0.3 s) | ``audiocraft.modules.transformer`` | stock attention's ``ops.unbind`` and kernels; our decoder never calls them |
| ``sklearn.metrics`` (1.5-1.7 s) | ``transformers.generation.candidate_generator`` | ``roc_curve``, in assisted generation |
| ``audiocraft.models.multibanddiffusion`` (~1 s: solvers, metrics, torchmetrics, scipy.signal) | ``audiocraft.models`` | MultiBand Diffusion, loaded on first use (``MUSICGEN_MBD=lazy``) |
| ``scipy.optimize`` / ``scipy.signal`` / ``scipy.ndimage`` | transformers' detection losses, librosa's filters | not the chroma filter bank |

All together, ``import audiocraft.models`` after torch went from 7.9-8.5 s to 4.8-5.5 s on that
machine (``bench/coldstart.py`` reports imports with and without). What stays is what MusicGen
needs, and ``torch._dynamo`` (1.4-2.2 s, with the ``torch.distributed.tensor`` it pulls in through
FSDP), which transformers applies as decorators at import time (``@torch._dynamo.allow_in_graph`` in
``modeling_utils``, ``@torch.compiler.disable`` in ``integrations.flex_attention``): a stand-in would
have to imitate what those decorators do, so it is not deferred (deferring only
``torch.distributed.tensor``, which ``model_debugging_utils`` imports, gains nothing: dynamo imports
it next).

Within :func:`deferred_imports`, each of those modules is a stand-in in ``sys.modules``: importing it
(``import spacy``, ``from xformers import ops``, ``from sklearn.metrics import roc_curve``) binds
the stand-in, or a stand-in for the name, and the first real use of any of them (an attribute read,
a call) imports the real module and hands over the real object. A stand-in carries the real
module's spec, so ``importlib.util.find_spec`` (how libraries test what is installed) answers as
usual. When the block ends the stand-ins leave ``sys.modules``, so every later ``import`` gets the
real module. Nothing is replaced: the same code runs when used, it is only imported later (stock
attention's first ``ops.unbind`` imports xformers then: training does, our decoder never does).
Only names used as functions or through their attributes are taken as stand-ins (never a class that
something tests with ``isinstance``).

``tests/test_imports.py`` checks what a setup and a prediction import, and that each stand-in
delivers the real object.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types
import typing as tp

# module -> the names other modules take from it with ``from module import name``
DEFERRED: tp.Dict[str, tp.Tuple[str, ...]] = {
    "spacy": (),
    "dora": ("get_xp",),
    "dora.distrib": ("rank", "world_size", "init", "get_distrib_spec"),  # (flashy's; functions)
    "xformers": ("ops",),
    "xformers.ops": ("unbind", "memory_efficient_attention", "LowerTriangularMask"),  # (the class: only
    # imported by audiocraft's build-time check, used where the xformers backend runs, imported again there)
    "sklearn.metrics": ("roc_curve",),
    "audiocraft.models.multibanddiffusion": ("MultiBandDiffusion",),
    "scipy.optimize": ("linear_sum_assignment",),
    "scipy.signal": (),
    "scipy.ndimage": (),
}

_LOCK = threading.RLock()


def _real_module(name: str) -> types.ModuleType:
    with _LOCK:
        current = sys.modules.get(name)
        if isinstance(current, _StandIn):
            del sys.modules[name]
        return importlib.import_module(name)


def _spec(name: str) -> tp.Any:
    """The module's spec, found without importing it or its parents (``importlib.util.find_spec``
    would import the parents); None if it is not installed."""
    from importlib.machinery import PathFinder

    parts = name.split(".")
    spec = sys.modules[parts[0]].__spec__ if parts[0] in sys.modules else PathFinder.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), spec.submodule_search_locations)
    return spec


class _StandIn(types.ModuleType):
    """A module imported on its first real use; it carries the real module's spec, so that
    ``importlib.util.find_spec`` (how libraries test what is installed) answers as usual."""

    def __init__(self, name: str, names: tp.Iterable[str], spec: tp.Any):
        super().__init__(name, f"stand-in for {name}, imported on first use (musicgen_service.core.imports)")
        self.__spec__ = spec
        if spec.submodule_search_locations is not None:  # a package: `from pkg import x` asks for it
            self.__path__ = list(spec.submodule_search_locations)
        for attr in names:
            child = f"{name}.{attr}"
            setattr(self, attr, _STAND_INS.get(child) or _Name(name, attr))

    def __getattr__(self, attr: str) -> tp.Any:
        if attr.startswith("__") and attr.endswith("__"):  # import machinery probing: not a use
            raise AttributeError(attr)
        return getattr(_real_module(self.__name__), attr)


class _Name:
    """A name taken from a stand-in module; calling it (or reading an attribute of it) imports the
    module and uses the real object."""

    def __init__(self, module: str, name: str):
        self._module, self._name = module, name

    def _real(self) -> tp.Any:
        return getattr(_real_module(self._module), self._name)

    def __call__(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        return self._real()(*args, **kwargs)

    def __getattr__(self, attr: str) -> tp.Any:
        return getattr(self._real(), attr)

    def __repr__(self) -> str:
        return f"<{self._module}.{self._name}, imported on first use>"


_STAND_INS: tp.Dict[str, _StandIn] = {}


class _RealParents:
    """A meta path finder active within the block: a real submodule of a stand-in package (not a
    stand-in itself) is about to be imported, so the package it belongs to is imported for real
    first, as Python would have done."""

    @staticmethod
    def find_spec(name: str, path: tp.Any = None, target: tp.Any = None) -> None:
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if isinstance(sys.modules.get(parent), _StandIn) and name not in _STAND_INS:
                _real_module(parent)
        return None


@contextlib.contextmanager
def deferred_imports() -> tp.Iterator[None]:
    """Within the block, the modules of :data:`DEFERRED` not imported yet are stand-ins (see the
    module's docstring); afterwards they import as usual."""
    with _LOCK:
        installed = []
        for name in sorted(DEFERRED, key=lambda n: -n.count(".")):  # children first: parents bind them
            spec = None if name in sys.modules else _spec(name)
            if spec is None:  # imported already, or not installed: nothing to defer
                continue
            stand_in = _StandIn(name, DEFERRED[name], spec)
            _STAND_INS[name] = stand_in
            sys.modules[name] = stand_in
            installed.append(name)
        finder = _RealParents()
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with _LOCK:
            sys.meta_path.remove(finder)
            for name in installed:
                if sys.modules.get(name) is _STAND_INS.get(name):
                    del sys.modules[name]
                _STAND_INS.pop(name, None)
