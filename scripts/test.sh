#!/usr/bin/env bash
# README's second command (and CI's): install everything, then run the whole test suite,
# slow/llm/browser-marked tests included (the ray extra too: the Ray Data engine test runs in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
# The llm extra builds llama-cpp-python from source once (CPU-only, all cores); pip caches the wheel
# in ~/.cache/pip, so later runs install it in seconds.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
MEDSEARCH_EXTRAS=${MEDSEARCH_EXTRAS:-dev,llm,ray,milvus} bash scripts/setup.sh
# Browser tests (marker `browser`) drive Debian's Chromium through Playwright; Playwright's own
# browser download is never used. Installed only where it is missing and we may (root or CI).
# PACS tests (marker `pacs`) start Debian's Orthanc with its DICOMweb plugin and push with dcmtk.
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null || need+=(dcmtk)
if [ ${#need[@]} -gt 0 ] && { [ "$(id -u)" = 0 ] || [ -n "${CI:-}" ]; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # Debian starts an Orthanc service on port 8042/4242 where an init system runs; the tests start their own.
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
exec .venv/bin/python -m pytest "$@"
