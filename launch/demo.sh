#!/usr/bin/env bash
# The demo: set up, prepare the embedded data (text, digits with captions, espeak-ng speech), train a
# small tri-modal model on 8 simulated CPU devices, evaluate it and sample every task from it.
# Outputs land in runs/demo: metrics.jsonl, TensorBoard events, checkpoints, eval_STEP.json with its
# galleries, and samples/TASK/index.html (open them in a browser).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORKDIR="${WORKDIR:-runs/demo}"
tmdm prepare --config=experiments/demo.py "$@"
tmdm train --config=experiments/demo.py --workdir="$WORKDIR" --host_devices=8 "$@"
tmdm eval --workdir="$WORKDIR" --host_devices=8
tmdm sample --workdir="$WORKDIR" --host_devices=8 --task=t2i --n=4 \
  --prompt="a handwritten digit seven" --prompt="the number 3 written by hand" --prompt="a handwritten digit zero"
tmdm sample --workdir="$WORKDIR" --host_devices=8 --task=t2s --n=2 --prompt="the lord is my shepherd"
tmdm sample --workdir="$WORKDIR" --host_devices=8 --task=i2t --n=8
tmdm sample --workdir="$WORKDIR" --host_devices=8 --task=s2t --n=8
tmdm sample --workdir="$WORKDIR" --host_devices=8 --task=text --n=4 --prompt="" --prompt="And God said"
echo "galleries: $WORKDIR/samples/*/index.html and $WORKDIR/eval_*/*/index.html"
