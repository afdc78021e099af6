#!/usr/bin/env python3
"""Write the lock files: every third-party package CI and the images install, at one version.

    python3 scripts/lock.py                                  # constraints/py3.X.txt for python3
    python3 scripts/lock.py --python /path/to/python3.12 ... # one file per interpreter (make lock)

Each interpreter gets a fresh venv with the newest releases the two pyproject files admit (the
client's and the server's dependencies with the `dev` and `demo` extras), and `pip freeze` of it
becomes `constraints/pyMAJOR.MINOR.txt`. scripts/install.sh installs with the file of the running
Python as a pip constraint (`-c`), so a clean CI machine and a container build get the versions
the last `make test` passed with, not whatever was released since (SOFTGATE_INSTALL_UNLOCKED=1
skips it).
torch is left out: TORCH_SPEC chooses it (a CPU or a CUDA build, of any release the range admits)
and pip picks what torch itself needs. `floors` reads the other end of the ranges: the lowest
versions a pyproject admits on the running Python (scripts/tools/client_floors.sh).
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # (the server depends on tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "constraints"
PYPROJECTS = (ROOT / "client" / "pyproject.toml", ROOT / "pyproject.toml")
EXTRAS = ("dev", "demo")
UNLOCKED = ("torch", "softgate-client")  # chosen by TORCH_SPEC; this tree's own client


def requirements() -> list[str]:
    """The project's third-party requirements (PEP 508 strings, markers kept): both pyprojects'
    dependencies and the `dev` and `demo` extras, without torch and the project's own client."""
    out: list[str] = []
    for path in PYPROJECTS:
        project = _project(path)
        reqs = list(project.get("dependencies", []))
        for extra in EXTRAS:
            reqs += project.get("optional-dependencies", {}).get(extra, [])
        for r in reqs:
            if normalise(Requirement(r).name) not in UNLOCKED and r not in out:
                out.append(r)
    return out


def floors(pyproject: Path) -> list[str]:
    """`name==version` of each `>=` floor among a pyproject's dependencies that apply to the
    running Python (scripts/tools/client_floors.sh installs the client's)."""
    reqs = map(Requirement, _project(pyproject)["dependencies"])
    return [
        f"{r.name}=={s.version}"
        for r in reqs
        if r.marker is None or r.marker.evaluate()
        for s in r.specifier
        if s.operator == ">="
    ]


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: `PyYAML`, `pyyaml` -> `pyyaml`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _project(pyproject: Path) -> dict[str, Any]:
    """A pyproject file's [project] table."""
    return tomllib.loads(pyproject.read_text())["project"]


def read(path: Path) -> dict[str, str]:
    """A lock file's pins: version by normalised name."""
    lines = (ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))
    return {normalise(name): version for name, version in (ln.split("==") for ln in lines)}


def lock(python: str) -> Path:
    """Resolve `requirements()` in a fresh venv of `python`; write and return its lock file."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, "-m", "venv", tmp], check=True)
        vpy = str(Path(tmp) / "bin" / "python")
        version = subprocess.run(
            [vpy, "-c", "import platform; print(platform.python_version())"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        pip = [vpy, "-m", "pip", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "-q", *requirements()], check=True, timeout=900)
        frozen = subprocess.run([*pip, "freeze"], check=True, capture_output=True, text=True).stdout
    pins = sorted((ln for ln in frozen.splitlines() if "==" in ln), key=str.lower)
    minor = ".".join(version.split(".")[:2])
    path = LOCK_DIR / f"py{minor}.txt"
    LOCK_DIR.mkdir(exist_ok=True)
    path.write_text(
        f"# Written by `make lock` (scripts/lock.py) on {datetime.date.today()} with Python {version}:\n"
        f"# the versions scripts/install.sh installs on Python {minor} (a pip constraint; torch is\n"
        "# chosen by TORCH_SPEC). Rewrite it, then run `make test`, to move to newer releases.\n"
        + "\n".join(pins)
        + "\n"
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", nargs="+", default=["python3"], help="interpreters to lock for")
    for python in ap.parse_args().python:
        path = lock(python)
        print(f"{path.relative_to(ROOT)}: {len(read(path))} pins")


if __name__ == "__main__":
    main()
