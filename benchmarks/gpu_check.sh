#!/usr/bin/env bash
# Issue 17 GPU check (one GPU, <= 8 minutes): VAR-d16 / MAR-B sampling images/s at batch 1 and 64
# (bf16; fp32 at 64), ours vs official, training-step throughput, peak memory.
# Writes $OUT/gpu_check.{json,md} (OUT defaults to ./gpu_check_out).
# The official code is read from .official/VAR and .official/mar (git-ignored copies of
# FoundationVision/VAR and LTH14/mar; carry them to the GPU machine) or OFFICIAL_VAR / OFFICIAL_MAR;
# official MAR also needs timm 0.9.x (e.g. PYTHONPATH including a `pip install --no-deps
# --target DIR timm==0.9.16`). Missing official code -> ours-only rows, noted in the output.
# Dry run on a CPU with tiny sizes:  bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia_smi.csv" 2>/dev/null || true
timeout 470 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s 420 "$@" 2>&1 | tee "$OUT/gpu_check.log"
