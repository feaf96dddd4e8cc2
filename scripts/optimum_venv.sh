#!/usr/bin/env bash
# Make the separate virtualenv for pop-bench's "Optimum peer" (bench/optimum_peer.py):
# the standard Hugging Face Optimum ONNX export run in ONNX Runtime.  It cannot live
# in pop's .venv: optimum-onnx pins transformers<4.58, pop needs transformers 5.x.
# Idempotent: returns at once when the venv was made from this version of the
# script (the stamp hashes it, so changing a pin reinstalls) and its imports work.
# Prints the venv's python path on stdout (progress goes to stderr).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POP_OPTIMUM_VENV:-$ROOT/.venv-optimum}"
PY="$VENV/bin/python"
STAMP="$VENV/.optimum-venv-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

# Every package the peer imports directly, pinned to a set verified to work together.
# torch goes in first and alone: its CPU wheel comes from pip's find-links
# (/etc/pip.conf), any looser torch would pull gigabytes of CUDA wheels.
TORCH="torch==2.13.0"
PINS=(
  "optimum-onnx==0.1.0"
  "optimum==2.1.0"
  "transformers==4.57.6"
  "tokenizers==0.22.2"
  "huggingface-hub==0.36.2"
  "onnx==1.23.2"
  "onnxruntime==1.32.0"
  "numpy==2.4.6"
  "safetensors==0.8.0"
)

ready() {
  [ -f "$STAMP" ] && [ -x "$PY" ] && "$PY" -c 'import torch, transformers, optimum.onnxruntime, optimum.exporters.onnx, onnxruntime' \
    >/dev/null 2>&1
}

if ! ready; then
  echo "optimum_venv: installing the pinned stack into $VENV (first run only)" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH"
  # the constraint keeps the second install from swapping torch for another build
  "$VENV/bin/pip" install -q "${PINS[@]}" "$TORCH"
  rm -f "$VENV"/.optimum-venv-*
  touch "$STAMP"
  ready || { echo "optimum_venv: imports fail in $VENV" >&2; exit 1; }
fi
echo "$PY"
