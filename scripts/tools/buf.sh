#!/usr/bin/env bash
# Installs buf (npm @bufbuild/buf) into .tools/node_modules for `buf lint` of proto/.
# Idempotent and bounded in time; .tools/ is git-ignored. Needs node >= 18 and npm.
# Usage afterwards: .tools/node_modules/.bin/buf lint proto
set -euo pipefail
cd "$(dirname "$0")/../.."
BUF_VERSION="${BUF_VERSION:-1.47.2}"
bin=.tools/node_modules/.bin/buf
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  echo "buf: up to date ($("$bin" --version))"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "buf.sh: npm missing; install Debian's nodejs and npm (scripts/tools/node_grpc.sh does)" >&2
  exit 1
fi
mkdir -p .tools
timeout 300 npm install --prefix .tools --no-audit --no-fund --loglevel=error "@bufbuild/buf@${BUF_VERSION}"
echo "buf: installed $("$bin" --version)"
