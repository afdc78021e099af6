#!/usr/bin/env bash
# Fill .whl/ with what bench/device_check.sh needs on a GPU host that has torch and numpy but
# cannot reach a registry (the H200 image: Python 3.12, torch 2.11, no fastapi, no
# grpcio-health-checking, no allocator libraries): wheels for Python 3.12 at
# the versions of constraints/py3.12.txt (what install.sh installs there), and the allocator libraries
# into .whl/lib/. .whl/ is git-ignored through .git/info/exclude; carry it to the host.
#
#   bash bench/device_wheels.sh && <run on the host, carrying .whl>: bash bench/device_check.sh OUT ...
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PKGS="grpcio grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos protobuf
      fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
      typing-extensions anyio uvicorn h11 prometheus-client opentelemetry-api"
# the versions of the Python 3.12 lock (scripts/lock.py), else the ones installed here
pins=$($PY -c 'import sys; from importlib.metadata import version; from pathlib import Path
sys.path.insert(0, "scripts"); import lock
pins = lock.read(Path("constraints/py3.12.txt"))
print(" ".join(f"{n}=={pins.get(lock.normalise(n)) or version(n)}" for n in sys.argv[1:]))' $PKGS)
rm -rf .whl && mkdir -p .whl/lib
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
for lib in libtcmalloc_minimal.so.4 libjemalloc.so.2; do
    cp -L "/usr/lib/x86_64-linux-gnu/$lib" .whl/lib/ 2>/dev/null || echo "no $lib here: the host runs without it"
done
du -sh .whl
