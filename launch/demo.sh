#!/usr/bin/env bash
# The demo: set up, prepare the embedded data (text, digits with captions, espeak-ng speech), train a
# small tri-modal model on one CPU device, evaluate it and sample every task from it.
# Outputs land in runs/demo: metrics.jsonl, TensorBoard events, checkpoints, eval_STEP.json with its
# galleries, and samples/TASK/index.html (open them in a browser).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORKDIR="${WORKDIR:-runs/demo}"
tmdm prepare --config=experiments/demo.py "$@"
tmdm train --config=experiments/demo.py --workdir="$WORKDIR" "$@"
tmdm eval --workdir="$WORKDIR"
tmdm sample --workdir="$WORKDIR" --task=t2i --n=4 \
  --prompt=seven --prompt=three --prompt=zero
tmdm sample --workdir="$WORKDIR" --task=t2s --n=2 --prompt="four two nine one"
tmdm sample --workdir="$WORKDIR" --task=i2t --n=8
tmdm sample --workdir="$WORKDIR" --task=s2t --n=8
tmdm sample --workdir="$WORKDIR" --task=text --n=4 --prompt="" --prompt="And God said"
echo "galleries: $WORKDIR/samples/*/index.html and $WORKDIR/eval_*/*/index.html"
