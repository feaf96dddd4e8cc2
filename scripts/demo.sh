#!/usr/bin/env bash
# The main job on the default model: export Gemma-3 270M with POP, verify it,
# and generate from the exported graphs with pop's runtime.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
pop-export --model gemma3-270m --format onnx
pop-generate artifacts/gemma3-270m-onnx-pop --prompt "It is a truth universally acknowledged" --max-new-tokens 48
