#!/usr/bin/env bash
# Everything a fresh machine needs before Forge can run: the package, a Docker engine, a base image,
# and the CPU runner image. Idempotent and cached: a second run takes seconds.
#
# FORGE_BASE_IMAGE: use this base for the CPU image (e.g. python:3.11-slim-bookworm where a registry
# is reachable). Unset: bootstrap a local Debian base with debootstrap (no registry needed).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*" >&2; }

say "installing forge (host CLI + test and runner extras)"
python3 -m pip install -q -e ".[runner,test]"
# Packages whose declared dependencies must stay out (see the file for why).
python3 -m pip install -q --no-deps -r images/no-deps-requirements.txt

bash scripts/ensure-docker.sh

# The queue tests start a PostgreSQL server of their own from Debian's binaries.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  say "installing PostgreSQL server binaries (for the queue tests)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -q postgresql >/dev/null 2>&1 || { $sudo apt-get update -q && $sudo apt-get install -y -q postgresql >/dev/null; }
fi

base=${FORGE_BASE_IMAGE:-}
if [ -z "$base" ]; then
  base=forge-base:bookworm
  forge images bootstrap --tag "$base"
fi

# Stage a CPU torch wheel when this machine has one locally: the image then needs no CUDA download
# and no access to the official CPU index. Anything but a +cpu wheel is thrown away.
if ! ls wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  mkdir -p wheels
  python3 -m pip download -q torch==2.13.0 --no-deps -d wheels || true
  find wheels -name 'torch-*.whl' ! -name '*+cpu*' -delete
fi

forge images build cpu --base "$base"
