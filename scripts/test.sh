#!/usr/bin/env bash
# All tests, the real-model ones (marked slow) included; extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
# pop-bench's Optimum peer lives in its own venv (it pins transformers < 4.58)
bash "$ROOT/scripts/optimum_venv.sh" > /dev/null
# and so does onnxruntime-genai's (it pins its own onnxruntime)
bash "$ROOT/scripts/genai_venv.sh" > /dev/null
cd "$ROOT"
python -m pytest -ra --durations=15 "$@"
