#!/usr/bin/env bash
# Make the separate virtualenv for pop-load's llama.cpp peer: llama-cpp-python's OpenAI-compatible
# server (python -m llama_cpp.server) over the same GGUF files that pop's presets convert.
# PyPI has only its source, so this compiles llama.cpp for this CPU (GGML_NATIVE: AVX-512, VNNI,
# BF16 here); it takes minutes on 2 cores, once.
# Idempotent: returns at once when the venv was made from this version of the script (the stamp
# hashes it) and the server imports.  Prints the venv's python path on stdout (progress on stderr).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POP_LLAMACPP_VENV:-$ROOT/.venv-llamacpp}"
PY="$VENV/bin/python"
STAMP="$VENV/.llamacpp-venv-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
PIN="llama-cpp-python[server]==0.3.36"

ready() {
  [ -f "$STAMP" ] && [ -x "$PY" ] && "$PY" -c 'import llama_cpp, llama_cpp.server.app' >/dev/null 2>&1
}

if ! ready; then
  echo "llamacpp_venv: building $PIN into $VENV (first run only, minutes)" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install -q --no-cache-dir "$PIN"
  rm -f "$VENV"/.llamacpp-venv-*
  touch "$STAMP"
  ready || { echo "llamacpp_venv: llama_cpp.server does not import in $VENV" >&2; exit 1; }
fi
echo "$PY"
