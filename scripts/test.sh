#!/usr/bin/env bash
# The test suite, end-to-end tests against the real engine and CPU image included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# One model cache for the unit tests and the containers they start, so SmolLM2 is converted once.
export FORGE_MODEL_CACHE=${FORGE_MODEL_CACHE:-$HOME/.cache/forge/models}
export TESTCONTAINERS_RYUK_DISABLED=true
python3 -m pytest -v -ra "$@" tests
