#!/usr/bin/env bash
# Create .venv (if missing) and install medsearch with the extras named in $MEDSEARCH_EXTRAS.
# torch/torchvision are pinned to the pair known to work together with open_clip here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[${MEDSEARCH_EXTRAS:-dev}]"
