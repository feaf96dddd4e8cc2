#!/usr/bin/env bash
# The main job on the default model: export Gemma-3 270M with POP, verify it, continue a
# real prompt with pop's runtime, and show what POP buys on that prompt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
pop-export --model gemma3-270m --format onnx
echo
echo "== Pride and Prejudice, chapter 1 (scripts/demo_prompt.txt), continued into chapter 2 by the exported"
echo "== graphs; sampled with Gemma-3's published settings (temperature 1.0, top-k 64, top-p 0.95), seed 0:"
pop-generate artifacts/gemma3-270m-onnx-pop --prompt-file scripts/demo_prompt.txt --max-new-tokens 64 \
  --temperature 1.0 --top-k 64 --top-p 0.95 --seed 0 --compare-modes
if [ -x "$ROOT/.venv-genai/bin/python" ]; then  # made by scripts/genai_venv.sh
  echo
  echo "== the same prompt against onnxruntime-genai's own export of the same weights (unpruned, fp32):"
  pop-bench artifacts/gemma3-270m-onnx-pop --prompt-file scripts/demo_prompt.txt --batch 1 --runs 3 --warmup 1 \
    --new-tokens 8 --peers genai
fi
