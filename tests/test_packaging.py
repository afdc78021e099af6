"""The two distributions' metadata: the server needs its own release of the client, pydantic 2,
and both ship the license text they declare (found by a packaging audit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # (the server depends on tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECTS = {"server": ROOT / "pyproject.toml", "client": ROOT / "client" / "pyproject.toml"}


def _project(which: str) -> dict:
    return tomllib.loads(PYPROJECTS[which].read_text())["project"]


def _server_requirement(name: str) -> Requirement:
    (req,) = (r for r in map(Requirement, _project("server")["dependencies"]) if r.name == name)
    return req


def test_the_server_needs_its_own_release_of_the_client() -> None:
    """It imports the client's private modules and stubs: any other release may break it."""
    import softgate
    import softgate_client

    version = _project("client")["version"]
    assert _project("server")["version"] == version == softgate.__version__ == softgate_client.__version__
    assert str(_server_requirement("softgate-client").specifier) == f"=={version}"


def test_the_server_needs_pydantic_2() -> None:
    """The admin's models use pydantic 2's API; under 1.x its OpenAPI document was wrong."""
    spec = _server_requirement("pydantic").specifier
    assert not spec.contains("1.10.27") and spec.contains("2.0")


@pytest.mark.parametrize("which", sorted(PYPROJECTS))
def test_each_distribution_ships_its_license(which: str) -> None:
    project = _project(which)
    assert project["license"] == "Apache-2.0"
    (path,) = project["license-files"]
    text = (PYPROJECTS[which].parent / path).read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
