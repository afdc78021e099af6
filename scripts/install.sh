#!/usr/bin/env bash
# The one install path for CI, developers and the container images.
#   scripts/install.sh            the service (editable) + client
#   scripts/install.sh --dev      the same + test / lint tools
#   scripts/install.sh --image    non-editable, no dev tools (Dockerfiles)
# Each at the versions of constraints/pyX.Y.txt, the lock file of the running Python.
# torch comes first so that the project's own range is already satisfied:
#   TORCH_SPEC (default torch==2.13.0: the local CPU wheel on dev/CI machines) and
#   TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128 on a GPU image) choose it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
pip="python3 -m pip"
if ! python3 -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    $pip install "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX_URL"
  else
    $pip install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
# tcmalloc: `softgate serve` preloads it when present (allocator=auto; bench/RESULTS.md
# "End-to-end": 2-2.7x faster on large batches than glibc malloc). Best effort and bounded:
# only as root with apt-get, never failing the install.
have_tcmalloc() {
  for f in /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 \
    /usr/lib/libtcmalloc_minimal.so.4; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! have_tcmalloc; then
  pkg=libtcmalloc-minimal4
  if apt-cache show libtcmalloc-minimal4t64 >/dev/null 2>&1; then pkg=libtcmalloc-minimal4t64; fi
  { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends "$pkg" ||
    { timeout 120 apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends "$pkg"; }
  } >/dev/null 2>&1 || echo "install.sh: could not install $pkg (optional: softgate serve then uses glibc malloc)" >&2
fi
# Everything else at the versions of the lock file for this Python (scripts/lock.py, `make lock`):
# a clean CI machine or image build gets what the last `make test` passed with.
# SOFTGATE_INSTALL_UNLOCKED=1, or a Python with no lock file, takes the newest releases the
# pyproject files admit instead.
py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
lock=()
if [ "${SOFTGATE_INSTALL_UNLOCKED:-0}" = 1 ]; then
  echo "install.sh: SOFTGATE_INSTALL_UNLOCKED=1: the newest releases pyproject admits, not constraints/py$py.txt" >&2
elif [ -f "constraints/py$py.txt" ]; then
  lock=(-c "constraints/py$py.txt")
else
  echo "install.sh: no constraints/py$py.txt (make lock writes it): the newest releases pyproject admits" >&2
fi
case "$mode" in
  --dev) $pip install ${lock[@]+"${lock[@]}"} -e ./client -e ".[dev]" ;;
  --image) $pip install --no-cache-dir ${lock[@]+"${lock[@]}"} ./client ".[demo]" ;;
  *) $pip install ${lock[@]+"${lock[@]}"} -e ./client -e . ;;
esac
