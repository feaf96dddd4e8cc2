#!/usr/bin/env bash
# The GPU check, one command: pop's graphs on the GPU against eager PyTorch on the same GPU, and POP
# against full mode at llama-3.1-8b's shape (bench/gpu_check.py says what it checks and how).
#
#   bash scripts/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# Runs with the machine's own python (PYTHON, default python3): a CUDA PyTorch (2.11 or later),
# transformers (5.17 or later), onnx, onnxscript.  It installs nothing and needs no network; pop is
# imported from this source tree when it is not installed.  Writes gpu_check.json and gpu_check.png
# to $OUT when set, else to artifacts/gpu-check/.  Exit 1: a parity check failed.  --dry-run runs on the
# CPU at tiny sizes (what CI runs, so that the check does not rot).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/artifacts/gpu-check}"
if ! "$PY" -c "import pop.exporter.export" >/dev/null 2>&1; then
  # not installed: a package folder whose subpackages are this tree's top-level folders (pyproject's mapping)
  SHIM="$(mktemp -d)"
  trap 'rm -rf "$SHIM"' EXIT
  mkdir "$SHIM/pop"
  : > "$SHIM/pop/__init__.py"
  for d in exporter runtime bench quality cli; do ln -s "$ROOT/$d" "$SHIM/pop/$d"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
cd "$ROOT"
"$PY" -m pop.bench.gpu_check --out "$DEST" "$@"
