#!/usr/bin/env bash
# Issue 8's GPU benchmark: tmdm's real train step beside the plain-JAX yardstick, same card, same call.
#   bash launch/gpu_bench.sh PATH/TO/plain_step.py [PRESETS]
# Prints one JSON line per run and a table of tokens/s ratios (tmdm / yardstick). Settings tried for
# tmdm (model shape and sequence length stay the yardstick's): batch 16 with 'dots' remat, the same
# with the chunked cross-entropy (model.loss_chunk=512), and the same with GPU_FLAGS below; then rows of 4
# packed documents (segment-masked attention) with cuDNN and a dense [B, L, L] mask (what 'auto' picks in
# bf16) against Pallas' Triton flash kernel with segment ids (model.attention_impl=flash, no mask).
# Not yet run on a GPU (no device was lent to the task that wrote it): see BUILD_NOTES "The GPU benchmark, prepared".
set -uo pipefail
cd "$(dirname "$0")/.."
YARDSTICK="${1:?usage: bash launch/gpu_bench.sh PATH/plain_step.py [PRESETS] (the plain-JAX yardstick step)}"
PRESETS="${2:-bench-0.5b bench-1b}"
TMDM="${TMDM:-.venv/bin/tmdm}"
PY="${PY:-.venv/bin/python}"
# Candidate XLA flags for H100/H200 (latency-hiding scheduler; cuBLAS instead of Triton GEMMs).
GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
OUT="${OUT:-/tmp}/gpu_bench.jsonl"
: > "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for P in $PRESETS; do
  "$PY" "$YARDSTICK" --preset "$P" | grep '^{' | sed "s/^{/{\"setting\": \"yardstick\", /" | tee -a "$OUT"
  run() {  # setting name, then tmdm bench arguments
    local name="$1"; shift
    "$TMDM" bench step --preset "$P" --steps 10 "$@" | grep '^{' | sed "s/^{/{\"setting\": \"$name\", /" | tee -a "$OUT"
  }
  run b16-dots --batch 16 --remat dots
  run b16-dots-ce512 --batch 16 --remat dots --config.model.loss_chunk=512
  XLA_FLAGS="$GPU_FLAGS" run b16-dots-ce512-flags --batch 16 --remat dots --config.model.loss_chunk=512
  run seg4-cudnn-mask --batch 16 --remat dots --config.model.loss_chunk=512 --segments 4 --config.model.attention_impl=cudnn
  run seg4-flash --batch 16 --remat dots --config.model.loss_chunk=512 --segments 4 --config.model.attention_impl=flash
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = {r['preset']: r['tok_s'] for r in rows if r['setting'] == 'yardstick'}
print(f"\n{'preset':12s} {'setting':22s} {'tok/s':>10s} {'MFU':>7s} {'peak GiB':>9s} {'x yardstick':>12s}")
for r in rows:
  ratio = r['tok_s'] / base[r['preset']] if r['preset'] in base else float('nan')
  print(f"{r['preset']:12s} {r.get('setting', ''):22s} {r['tok_s']:10.0f} {r.get('mfu', float('nan')):7.3f} "
        f"{r.get('peak_mem_gb', float('nan')):9.2f} {ratio:12.3f}")
PYEOF
