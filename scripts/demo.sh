#!/usr/bin/env bash
# README's first command: set everything up, then ingest, index and query the shared datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDSEARCH_EXTRAS=${MEDSEARCH_EXTRAS:-dev} bash scripts/setup.sh
exec .venv/bin/medsearch demo --home "${MEDSEARCH_HOME:-$HOME/.medsearch-demo}" "$@"
