#!/usr/bin/env bash
# The main job on the embedded default (scikit-learn digits, CPU): train the VQ tokenizer,
# then MaskGIT on its tokens, then write a grid of class-conditional samples and 100 PNGs.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${GENMODELS:-.venv/bin/genmodels}
D=configs/data/digits.yaml
start=$(date +%s)
"$G" fit -c $D -c configs/tokenizers/vq_digits.yaml -c configs/experiments/digits_vq.yaml
"$G" fit -c $D -c configs/generators/maskgit_digits.yaml -c configs/experiments/digits_maskgit.yaml
"$G" predict -c $D -c configs/generators/maskgit_digits.yaml -c configs/experiments/digits_maskgit.yaml \
    --ckpt_path outputs/digits_maskgit/checkpoints/last.ckpt
grid=$(ls -t outputs/digits_maskgit/lightning_logs/version_*/predictions/grid.png | head -1)
echo "main job done in $(( $(date +%s) - start )) s; sample grid (a row per class 0..9): $grid"
