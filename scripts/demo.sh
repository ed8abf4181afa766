#!/usr/bin/env bash
# The whole job on the bundled sample, in the CPU container: plan → prepare → train, with progress.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

mkdir -p demo && cd demo
forge plan smoke --cpu --data ../examples/alpaca-sample.jsonl --data ../examples/chat-sample.jsonl
forge prepare
forge train
echo "Done. Rerun \`cd demo && forge train\` to see it resume (or finish at once); outputs are in demo/forge-out/."
