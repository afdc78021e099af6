#!/usr/bin/env bash
# Installs buf (npm @bufbuild/buf) into .tools/node_modules for `buf lint` of proto/.
# Idempotent and bounded in time; .tools/ is git-ignored. Needs node >= 18 and npm
# (scripts/ensure_node.sh). Usage afterwards: .tools/node_modules/.bin/buf lint proto
set -euo pipefail
cd "$(dirname "$0")/../.."
BUF_VERSION="${BUF_VERSION:-1.47.2}"
bin=.tools/node_modules/.bin/buf
if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "$BUF_VERSION" ]; then
  echo "buf: up to date ($BUF_VERSION)"
  exit 0
fi
bash scripts/ensure_node.sh
mkdir -p .tools
timeout 300 npm install --prefix .tools --no-audit --no-fund --loglevel=error "@bufbuild/buf@${BUF_VERSION}"
echo "buf: installed $("$bin" --version)"
