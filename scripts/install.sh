#!/usr/bin/env bash
# The one install path for CI, developers and the container images.
#   scripts/install.sh            the service (editable) + client
#   scripts/install.sh --dev      the same + test / lint tools
#   scripts/install.sh --image    non-editable, no dev tools (Dockerfiles)
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
case "$mode" in
  --dev) $pip install -e ./client -e ".[dev]" ;;
  --image) $pip install --no-cache-dir ./client ".[demo]" ;;
  *) $pip install -e ./client -e . ;;
esac
