#!/usr/bin/env bash
# Installs the Node.js test's dependencies (@grpc/grpc-js, @grpc/proto-loader) into
# tests/node/node_modules from the committed package-lock.json. Idempotent and bounded in
# time; node_modules is git-ignored. Needs node >= 18 and npm (scripts/ensure_node.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=tests/node
bash scripts/ensure_node.sh
stamp="$dir/node_modules/.package-lock.json"
if [ -f "$stamp" ] && [ "$stamp" -nt "$dir/package-lock.json" ] \
   && [ -d "$dir/node_modules/@grpc/grpc-js" ] && [ -d "$dir/node_modules/@grpc/proto-loader" ]; then
  echo "node_grpc: up to date ($(node --version))"
  exit 0
fi
timeout 300 npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
echo "node_grpc: installed @grpc/grpc-js $(node -p "require('./$dir/node_modules/@grpc/grpc-js/package.json').version") with node $(node --version)"
