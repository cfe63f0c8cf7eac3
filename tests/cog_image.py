"""What `cog build` (Cog 0.23) does with this project's files, for the tests that reproduce it.

Facts from replicate/cog's source (the cog 0.23.1 sdist on PyPI carries it):
- pkg/config/config.go ``PythonRequirementsForArch`` and pkg/requirements ``ReadRequirements``:
  requirements.txt is rewritten without comments or blank lines, index options first (for
  ``torch==2.11.0`` on a GPU build: ``--extra-index-url https://download.pytorch.org/whl/cu130/``);
  pkg/dockerfile/standard_generator.go ``filterManagedPackages`` drops ``cog`` and ``coglet``.
- standard_generator.go ``runCommands``: each ``build.run`` line becomes ``RUN <line>`` as written.
- pkg/image/build.go: the build context is the project folder less ``.cog/``, and the image gets
  it with ``COPY . /src``; Docker also leaves out what ``.dockerignore`` names.
"""

from __future__ import annotations

import re
import subprocess
import typing as tp
from pathlib import Path

import yaml

# standard_generator.go, UVVersion: the uv that Cog copies into every image.
COG_UV_VERSION = "0.9.26"
# The marker uv writes into the Pythons it installs (PEP 668), as Cog's images have it.
UV_EXTERNALLY_MANAGED = (
    "[externally-managed]\nError=This Python installation is managed by uv and should not be modified.\n"
)


def cog_config(root: Path) -> tp.Dict[str, tp.Any]:
    return yaml.safe_load((root / "cog.yaml").read_text())


def run_lines(config: tp.Mapping[str, tp.Any]) -> tp.List[str]:
    """cog.yaml's ``build.run`` commands, as the RUN lines get them (strings or ``command:`` items)."""
    return [(item["command"] if isinstance(item, dict) else item).strip() for item in config["build"].get("run") or []]


def cog_requirements(path: Path) -> tp.List[str]:
    """The requirement lines Cog writes for ``pip install -r`` (before adding its index lines)."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        line = line.split("#", 1)[0].strip()
        name = re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0].lower()
        if line and name not in ("cog", "coglet"):
            lines.append(line)
    return lines


def _pattern_regex(pattern: str) -> "re.Pattern[str]":
    """A .dockerignore pattern as Docker matches it: Go's filepath.Match per path segment, plus
    ``**`` for any number of segments; anchored at the context root."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_patterns(root: Path) -> tp.List[str]:
    lines = (root / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions (!) are not modelled here"
    return patterns


def dockerignored(path: str, patterns: tp.Sequence[str]) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out of the context: a pattern matches the
    path or one of the folders above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(_pattern_regex(p).match(prefix) for p in patterns for prefix in prefixes)


def build_context(root: Path) -> tp.List[str]:
    """The project files that reach ``/src``: those git knows (tracked or not ignored), less
    ``.cog/`` (Cog) and ``.dockerignore``'s patterns (Docker)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    patterns = dockerignore_patterns(root) + [".cog"]
    return sorted(f for f in listed.split("\0") if f and (root / f).is_file() and not dockerignored(f, patterns))
