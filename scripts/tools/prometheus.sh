#!/usr/bin/env bash
# Installs Prometheus (prometheus + promtool) from Debian's packages when either is missing.
# Idempotent and bounded in time. The package's system service is never started: tests
# start their own Prometheus on a loopback port with temporary storage.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "prometheus: $(prometheus --version 2>&1 | head -n1)"
  exit 0
fi
# (an audit: without apt-get this failed with only `timeout: failed to run command 'apt-get'`)
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus.sh: prometheus/promtool missing and no apt-get; install Prometheus by hand (both on PATH)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "prometheus.sh: not root and no sudo; install the Debian package 'prometheus' by hand" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Keep maintainer scripts from starting the service (exit 101 = action forbidden).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT
timeout 300 $SUDO apt-get update -qq
timeout 600 $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null && command -v prometheus >/dev/null
echo "prometheus: $(prometheus --version 2>&1 | head -n1)"
