#!/usr/bin/env bash
# The main job on the embedded default (scikit-learn digits, CPU): every built paradigm trained
# under one matched budget and scored by one judge (configs/compare/digits_quick.yaml). Prints the
# table and the paths of table.md / table.csv, the side-by-side sample grid and the plots.
# Rerunning reuses finished runs; extra arguments go to `genmodels compare` (e.g. --jobs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
G=${GENMODELS:-.venv/bin/genmodels}
exec "$G" compare -c configs/compare/digits_quick.yaml "$@"
