#!/usr/bin/env bash
# A venv with the pinned stub generator, grpcio-tools GRPCIO_TOOLS of scripts/gen_proto.py, for
# `make proto` / `make proto-check` and tests/test_proto.py: .tools/protoc. Not the newest release:
# the stubs it writes refuse an older protobuf / grpcio than itself, so its version is the client's
# floor (scripts/gen_proto.py says why this one). Made with PYTHON (default python3; the Makefile
# passes its PY). Idempotent (rebuilt when the pin or that Python changes) and bounded in time;
# .tools is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.tools/protoc
python="${PYTHON:-python3}"
pin=$("$python" -c 'import sys; sys.path.insert(0, "scripts"); import gen_proto; print(gen_proto.GRPCIO_TOOLS)')
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/version" 2>/dev/null)" = "$pin" ] \
   && [ "$("$venv/bin/python" -V)" = "$("$python" -V)" ]; then
  echo "protoc: up to date (grpcio-tools $pin)"
  exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
# wheels only: grpcio-tools $pin has them for CPython 3.8 to 3.13, not 3.14 or later
if ! timeout 300 "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: \
     "grpcio-tools==$pin"; then
  rm -rf "$venv"
  echo "protoc: could not install grpcio-tools==$pin on $("$python" --version) (wheels for 3.8 to 3.13)" >&2
  exit 1
fi
echo "$pin" > "$venv/version"
echo "protoc: installed grpcio-tools $pin"
