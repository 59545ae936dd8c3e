#!/usr/bin/env bash
# Set up genmodels in a virtual environment (default .venv) on a fresh machine.
#  - keeps an existing torch (a GPU user installs their own CUDA build first and runs
#    with VENV_FLAGS=--system-site-packages, or installs into the venv beforehand);
#  - otherwise installs the CPU build torch==2.13.0 (a local file on our CI machines),
#    never the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv ${VENV_FLAGS:-} "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q "torch==2.13.0"
fi
"$VENV/bin/pip" install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, lightning, genmodels; print('genmodels', genmodels.__version__, '| torch', torch.__version__, '| lightning', lightning.__version__)"
