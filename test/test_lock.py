"""Supply chain: requirements.lock pins every runtime dependency with hashes pip accepts, stays in sync with
pyproject.toml, and is what the image installs; the LICENSE matches the package's license."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from test.test_packaging import stages

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
ENTRY = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?: ; ([^\\\n]+?))?((?:\s*\\\n\s*--hash=sha256:[0-9a-f]{64})+)", re.MULTILINE
)
# Where the lock must hold: this interpreter, and the image's Debian base (bookworm's python3 is 3.11.2, which
# needs what a newer 3.11 does not, e.g. redis's async-timeout below 3.11.3).
ENVIRONMENTS = {
    "this interpreter": dict(default_environment()),
    "debian bookworm python3": {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.2"},
}


def locked(environment: dict[str, str] | None = None) -> dict[str, tuple[Version, list[str]]]:
    """name → (version, hashes); given an environment, only the entries whose marker holds there."""
    text = LOCK.read_text()
    entries = {
        canonicalize_name(name): (Version(version), re.findall(r"sha256:([0-9a-f]{64})", hashes))
        for name, version, marker, hashes in ENTRY.findall(text)
        if environment is None or not marker or Marker(marker).evaluate(environment)
    }
    if environment is not None:
        return entries
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(requirement_lines) == len(entries), "every requirement line is name==version with hashes"
    return entries


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def closure(requirements: list[Requirement], environment: dict[str, str]) -> set[str]:
    """The distributions these requirements pull in (markers evaluated in ``environment``, extras followed; the
    requirements of a distribution not installed here are not followed)."""
    seen: set[str] = set()
    todo = [(requirement, frozenset(requirement.extras)) for requirement in requirements]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            requires = []
        for line in requires:
            child = Requirement(line)
            environments = [{**environment, "extra": extra} for extra in ("", *extras)]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                todo.append((child, frozenset(child.extras)))
    return {key.split("[")[0] for key in seen}


def test_every_locked_requirement_is_pinned_with_hashes() -> None:
    entries = locked()
    assert len(entries) > 30
    for name, (_version, hashes) in entries.items():
        assert hashes, name
    assert "--index-url" not in LOCK.read_text() and "--find-links" not in LOCK.read_text()  # no machine's mirrors


def test_the_lock_satisfies_every_runtime_pin_of_pyproject() -> None:
    entries = locked()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is a runtime dependency missing from requirements.lock: ./commands lock"
        version = entries[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock has {name}=={version}, pyproject asks {requirement.specifier}: ./commands lock"
        )


@pytest.mark.parametrize("where", sorted(ENVIRONMENTS))
def test_the_lock_holds_exactly_what_the_runtime_dependencies_pull_in(where: str) -> None:
    environment = ENVIRONMENTS[where]
    wanted = closure([r for r in runtime_requirements() if not r.marker or r.marker.evaluate(environment)], environment)
    entries = set(locked(environment))
    assert entries == wanted, f"missing: {sorted(wanted - entries)}, extra: {sorted(entries - wanted)}"


def test_the_image_base_gets_what_redis_needs_below_3_11_3() -> None:
    assert "async-timeout" in locked(ENVIRONMENTS["debian bookworm python3"])
    assert "async-timeout" not in locked({**default_environment(), "python_full_version": "3.11.9"})


def test_the_dev_tooling_is_not_locked_into_the_image() -> None:
    entries = locked()
    for tool in ("pytest", "ruff", "mypy", "moto", "playwright", "uv"):
        assert canonicalize_name(tool) not in entries, tool


@pytest.mark.slow
def test_pip_accepts_the_locked_hashes(tmp_path: Path) -> None:
    """What pip would install for the lock (wheels, as the image does) matches the hashes it lists."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--require-hashes"),
            *("--only-binary=:all:", "--no-deps", "-r", str(LOCK), "-d", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*.whl"))) == len(locked(ENVIRONMENTS["this interpreter"]))


def test_the_image_installs_the_lock_with_hashes_then_the_package_alone() -> None:
    build = stages((ROOT / "Dockerfile").read_text())[-2]
    runs = [line for line in build if line.upper().startswith("RUN ")]
    lock_install = [line for line in runs if "-r requirements.lock" in line]
    assert len(lock_install) == 1 and "--require-hashes" in lock_install[0] and "--no-deps" in lock_install[0]
    package_install = [line for line in runs if re.search(r"pip install [^&]*--no-deps[^&]* \.(\s|$)", line)]
    assert len(package_install) == 1 and "pip check" in package_install[0]
    assert build.index(lock_install[0]) < build.index(package_install[0])
    assert [line for line in runs if "pip install" in line] == [lock_install[0], package_install[0]]
    assert any(line.startswith("COPY requirements.lock") for line in build)


def test_the_license_file_matches_pyproject() -> None:
    license_field = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert license_field == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text
