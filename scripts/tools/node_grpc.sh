#!/usr/bin/env bash
# Installs the Node.js test's dependencies (@grpc/grpc-js, @grpc/proto-loader) into
# tests/node/node_modules from the committed package-lock.json. Idempotent and bounded in
# time; node_modules is git-ignored. Needs node >= 18 and npm (Debian: nodejs, npm).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=tests/node
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
      echo "node_grpc.sh: node/npm missing, not root and no sudo; install Debian's nodejs and npm" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 $SUDO apt-get update -qq
  timeout 600 $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
stamp="$dir/node_modules/.package-lock.json"
if [ -f "$stamp" ] && [ "$stamp" -nt "$dir/package-lock.json" ] \
   && [ -d "$dir/node_modules/@grpc/grpc-js" ] && [ -d "$dir/node_modules/@grpc/proto-loader" ]; then
  echo "node_grpc: up to date ($(node --version))"
  exit 0
fi
timeout 300 npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
echo "node_grpc: installed @grpc/grpc-js $(node -p "require('./$dir/node_modules/@grpc/grpc-js/package.json').version") with node $(node --version)"
