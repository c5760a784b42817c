#!/usr/bin/env bash
# GPU check for issue 7 (prepared script, < 8 minutes on one H200). Installs nothing from the network.
#
#   bash benchmarks/gpu_check.sh            # CUDA host: ViT-B/16 @224 bf16, medpix PNGs, 1M-vector search
#   bash benchmarks/gpu_check.sh --tiny     # anywhere (CPU): tiny ViT @64 px, 20k vectors, same table
#
# Needs a Python (3.10+) with torch (CUDA build on the GPU host), torchvision, numpy, pillow and
# faiss (faiss-cpu or faiss-gpu). Also used when importable: open_clip_torch (+ ftfy, regex,
# huggingface_hub, safetensors, timm, tqdm) for the real OpenClipEncoder, sqlite-utils (+ click,
# click-default-group, sqlite-fts4, tabulate, python-dateutil, pluggy) for the PNG -> catalog run.
# Missing pieces are reported in the table's notes; the rest still runs.
# If ./.whl holds wheel files and those modules are missing, they are unpacked with
# `pip install --no-index --no-deps --target` into a temporary folder (local files only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${MEDSEARCH_WHEELS:-.whl}
if ! "$PY" -c "import open_clip, faiss, sqlite_utils" 2>/dev/null && [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/medsearch-gpucheck-site.XXXXXX)
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl || echo "note: local wheel unpack failed; continuing"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# 470 s hard stop; the script itself skips later sections past its --budget (450 s)
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
