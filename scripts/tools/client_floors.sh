#!/usr/bin/env bash
# A venv with the client's dependencies at the lowest versions client/pyproject.toml admits
# (grpcio, protobuf, numpy), for tests/test_client_floors.py: .tools/client-floors. The client
# itself is not installed there; the test puts client/ on the path. The floors and the venv are
# those of PYTHON (default python3; the Makefile passes its PY), the Python the tests run on.
# Idempotent (rebuilt when the floors or that Python change) and bounded in time; .tools is
# git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.tools/client-floors
python="${PYTHON:-python3}"
pins=$("$python" -c 'import sys; sys.path.insert(0, "scripts"); import lock
print(" ".join(lock.floors(lock.PYPROJECTS[0])))')
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/pins" 2>/dev/null)" = "$pins" ] \
   && [ "$("$venv/bin/python" -V)" = "$("$python" -V)" ]; then
  echo "client_floors: up to date ($pins)"
  exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
# wheels only (client/pyproject.toml gives numpy's floor per Python: the first release with
# wheels for it). A floor with no wheel for this Python leaves no venv: the test then skips,
# saying so, and fails under CI (CI set).
if ! timeout 300 "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: $pins; then
  rm -rf "$venv"
  echo "client_floors: could not install $pins on $("$python" --version); tests/test_client_floors.py skips" >&2
  exit 0
fi
echo "$pins" > "$venv/pins"
echo "client_floors: installed $pins"
