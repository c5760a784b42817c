#!/usr/bin/env bash
# README's second command (and CI's): install everything, then run the whole test suite,
# slow/llm/browser-marked tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDSEARCH_EXTRAS=${MEDSEARCH_EXTRAS:-dev} bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
