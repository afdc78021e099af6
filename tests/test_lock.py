"""The lock files (constraints/pyX.Y.txt, written by scripts/lock.py): each pins every requirement
of the two pyproject files within its range, and the environment the tests run in was installed
from the one of its Python (scripts/install.sh), so CI tests exactly what the lock says."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import lock  # noqa: E402

LOCKS = sorted(lock.LOCK_DIR.glob("py*.txt"))
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_the_requirements_are_both_pyprojects_without_torch() -> None:
    names = {lock.normalise(Requirement(r).name) for r in lock.requirements()}
    assert {
        "grpcio",
        "protobuf",
        "numpy",
        "fastapi",
        "uvicorn",
        "prometheus-client",
        "pytest",
        "tomli",
        "packaging",  # (scripts/lock.py's own: an audit found it undeclared)
    } <= names
    assert not names & {"torch", "softgate-client"}


def test_there_is_a_lock_for_ci_and_the_images() -> None:
    """CI and the CPU image run Python 3.11, the CUDA image Ubuntu 24.04's 3.12."""
    assert {p.name for p in LOCKS} >= {"py3.11.txt", "py3.12.txt"}


@pytest.mark.parametrize("path", LOCKS, ids=lambda p: p.name)
def test_a_lock_pins_every_requirement_within_its_range(path: Path) -> None:
    version = path.name[2:-4]
    env = {"python_version": version, "python_full_version": version + ".0"}
    pinned = lock.read(path)
    for req in map(Requirement, lock.requirements()):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = lock.normalise(req.name)
        assert name in pinned, f"{path.name} does not pin {req}"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{path.name} pins {name}=={pinned[name]}, outside {req}"
        )
    assert not {n for n in pinned if n in ("torch", "triton") or n.startswith("nvidia-")}, (
        "torch and its CUDA packages are TORCH_SPEC's choice"
    )


def test_this_environment_is_the_lock_of_its_python() -> None:
    """What install.sh installed here matches constraints/py<this Python>.txt: under CI it must
    (CI installs with the lock); elsewhere a mismatch skips, naming it."""
    path = lock.LOCK_DIR / f"py{THIS_PYTHON}.txt"
    if not path.exists() or os.environ.get("SOFTGATE_INSTALL_UNLOCKED") == "1":
        pytest.skip(f"no lock in use for Python {THIS_PYTHON}")
    wrong = []
    for name, version in lock.read(path).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "missing"
        if have != version:
            wrong.append(f"{name} {have} (locked {version})")
    if wrong and not os.environ.get("CI"):
        pytest.skip(f"installed without {path.name} (make install-dev applies it): " + ", ".join(wrong[:5]))
    assert not wrong, f"installed versions differ from {path.name}: " + ", ".join(wrong)
