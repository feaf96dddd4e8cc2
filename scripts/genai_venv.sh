#!/usr/bin/env bash
# Make the separate virtualenv for pop-bench's "onnxruntime-genai peer" (bench/genai_peer.py):
# Microsoft's model builder exports the model, onnxruntime-genai's Generator runs it.
# It lives apart from pop's .venv because onnxruntime-genai pins its own onnxruntime and
# its builder needs torch plus a transformers 5.x that has the classes it imports
# (e.g. Qwen3_5ForConditionalGeneration: no 4.x works).
# Idempotent: returns at once when the venv was made from this version of the
# script (the stamp hashes it, so changing a pin reinstalls) and its imports work.
# Prints the venv's python path on stdout (progress goes to stderr).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POP_GENAI_VENV:-$ROOT/.venv-genai}"
PY="$VENV/bin/python"
STAMP="$VENV/.genai-venv-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

# Every package the peer and the builder import directly, pinned to the set pip resolved
# for onnxruntime-genai==0.18.* (verified together on smollm2-135m and gemma3-270m).
# torch goes in first and alone: its CPU wheel comes from pip's find-links
# (/etc/pip.conf), any looser torch would pull gigabytes of CUDA wheels.
# transformers is pop's own version, so it reads the converted folders as pop wrote them.
TORCH="torch==2.13.0"
PINS=(
  "onnxruntime-genai==0.18.0"
  "onnxruntime==1.32.0"
  "transformers==5.23.0"
  "tokenizers==0.23.3"
  "huggingface-hub==2.4.0"
  "onnx==1.23.2"
  "onnx-ir==1.1.0"
  "numpy==2.4.6"
  "safetensors==0.8.0"
  "tqdm==4.70.1"
)

ready() {
  [ -f "$STAMP" ] && [ -x "$PY" ] && "$PY" -c 'import torch, transformers, onnx, onnxruntime, onnxruntime_genai, onnxruntime_genai.models.builder' \
    >/dev/null 2>&1
}

if ! ready; then
  echo "genai_venv: installing the pinned stack into $VENV (first run only)" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH"
  # the constraint keeps the second install from swapping torch for another build
  "$VENV/bin/pip" install -q "${PINS[@]}" "$TORCH"
  rm -f "$VENV"/.genai-venv-*
  touch "$STAMP"
  ready || { echo "genai_venv: imports fail in $VENV" >&2; exit 1; }
fi
echo "$PY"
