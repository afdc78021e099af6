#!/usr/bin/env bash
# The one install path for CI, developers and the container images.
#   scripts/install.sh            the service (editable) + client
#   scripts/install.sh --dev      the same + test / lint tools
#   scripts/install.sh --image    non-editable, no dev tools (Dockerfiles)
# Each into PYTHON (default python3; the Makefile passes its PY) at the versions of
# constraints/pyX.Y.txt, the lock file of that Python.
# torch comes first so that the project's own range is already satisfied:
#   TORCH_SPEC (default torch==2.13.0) and TORCH_INDEX_URL (e.g.
#   https://download.pytorch.org/whl/cu128 on a GPU image) choose it. On the CI interpreter
#   (Python 3.11) of the dev/CI machines the default is a local CPU wheel; on another Python, or
#   another machine, it is PyPI's default build, on Linux the CUDA one (GBs): set
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU build there.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
python="${PYTHON:-python3}"
pip() { "$python" -m pip "$@"; }
unlocked="${SOFTGATE_INSTALL_UNLOCKED:-0}"

# A locked install is skipped when what the last one installed from (the pyproject files, the
# lock files, this script), the interpreter and what its environment holds are all unchanged
# (an audit: every `make serve` reinstalled, 16-28 s before the server started, and failed
# offline). The stamps lie in the git-ignored .tools/; a --dev install holds the plain one's
# packages too. Delete .tools/install*.stamp to force an install.
stamp_key() {
  "$python" - pyproject.toml client/pyproject.toml constraints/*.txt scripts/install.sh <<'PY'
import hashlib, importlib.metadata, sys
h = hashlib.sha256(sys.executable.encode())
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        h.update(f.read())
# (with where an editable one points: another clone's `make install` into the same Python)
dists = sorted(
    (d.metadata["Name"] or "", d.version, d.read_text("direct_url.json") or "")
    for d in importlib.metadata.distributions()
)
h.update(repr(dists).encode())
print(h.hexdigest())
PY
}
# (Not an image's build, always fresh, nor an unlocked install, which upgrades what is there.)
stamp=""
if [ "$mode" != --image ] && [ "$unlocked" != 1 ]; then
  stamp=".tools/install${mode#-}.stamp"  # .tools/install.stamp, .tools/install-dev.stamp
fi
if [ -n "$stamp" ]; then
  key=$(stamp_key)
  for s in "$stamp" .tools/install-dev.stamp; do
    if [ "$(cat "$s" 2>/dev/null)" = "$key" ]; then
      echo "install.sh: up to date ($s; delete it to reinstall)"
      exit 0
    fi
  done
fi

# Skipped only when the installed torch is within the project's range (torch>=2.4): pip would
# upgrade an older one below to PyPI's default build, not TORCH_SPEC's (an audit: a 5.5 GB CUDA
# download over a torch 2.3).
torch_in_range='import importlib.metadata as m, re, sys
sys.exit(tuple(int(n) for n in re.findall(r"\d+", m.version("torch"))[:2]) < (2, 4))'
if ! "$python" -c "$torch_in_range" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX_URL"
  else
    pip install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
# tcmalloc: `softgate serve` preloads it when present (allocator=auto; bench/RESULTS.md
# "End-to-end": 2-2.7x faster on large batches than glibc malloc). Best effort and bounded:
# only as root with apt-get, never failing the install. Not for an image: its build stage is
# thrown away, and the final stage installs the allocator itself.
have_tcmalloc() {
  for f in /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 \
    /usr/lib/libtcmalloc_minimal.so.4; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if [ "$mode" != --image ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! have_tcmalloc; then
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
# pyproject files admit instead: upgrading what is installed (an audit: without --upgrade an
# existing environment kept its versions), all but torch, which stays TORCH_SPEC's.
py=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
lock=()
if [ "$unlocked" = 1 ]; then
  echo "install.sh: SOFTGATE_INSTALL_UNLOCKED=1: the newest releases pyproject admits, not constraints/py$py.txt" >&2
  torch=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))')
  lock=(--upgrade --upgrade-strategy eager "torch==$torch")
elif [ -f "constraints/py$py.txt" ]; then
  lock=(-c "constraints/py$py.txt")
else
  echo "install.sh: no constraints/py$py.txt (make lock writes it): the newest releases pyproject admits" >&2
fi
case "$mode" in
  --dev) pip install ${lock[@]+"${lock[@]}"} -e ./client -e ".[dev]" ;;
  --image) pip install --no-cache-dir ${lock[@]+"${lock[@]}"} ./client . ;;  # (no [demo]: matplotlib the server never runs)
  *) pip install ${lock[@]+"${lock[@]}"} -e ./client -e . ;;
esac
if [ -n "$stamp" ]; then
  mkdir -p .tools
  stamp_key >"$stamp"
fi
