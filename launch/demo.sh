#!/usr/bin/env bash
# The demo: set up, prepare the embedded data, train a small model on 8 simulated CPU devices, and
# sample from it. Outputs land in runs/demo (metrics.jsonl, TensorBoard events, checkpoints, samples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORKDIR="${WORKDIR:-runs/demo}"
tmdm prepare --config=experiments/demo.py "$@"
tmdm train --config=experiments/demo.py --workdir="$WORKDIR" --host_devices=8 "$@"
tmdm sample --workdir="$WORKDIR" --host_devices=8
