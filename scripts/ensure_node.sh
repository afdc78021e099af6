#!/usr/bin/env bash
# Installs Debian's nodejs and npm when node or npm is missing (the npm-based tools in
# scripts/tools/ call it first, whatever order they run in). Idempotent, bounded in time.
set -euo pipefail
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  exit 0
fi
# (an audit: without apt-get this failed with only `timeout: failed to run command 'apt-get'`)
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_node.sh: node/npm missing and no apt-get; install Node.js >= 18 with npm by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure_node.sh: node/npm missing, not root and no sudo; install Debian's nodejs and npm" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
timeout 300 $SUDO apt-get update -qq
timeout 600 $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
echo "ensure_node: installed node $(node --version), npm $(npm --version)"
