#!/usr/bin/env bash
# Put a smoke job for the CPU image on the queue ($FORGE_QUEUE) and follow it; exits with the job's code.
# Usage: submit-smoke.sh DIR, where DIR is on storage every agent sees at the same path.
set -euo pipefail
examples=$(cd "$(dirname "$0")/.." && pwd)
dir=$1
mkdir -p "$dir"
cp "$examples/chat-sample.jsonl" "$dir/"
cd "$dir"
forge plan smoke --cpu --data chat-sample.jsonl -o forge.yaml
job=$(forge submit --step both --name "smoke ${GITHUB_SHA:-local}" --json |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "Submitted $job; following it."
forge jobs logs --follow "$job"
