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
# Two workers, each given whole files (so a module's export, server or Ray cluster is made by one of them):
# one pytest process kept one core busy on average (CI: 34.5 min of user time in 38.7 of wall), its time going
# to torch.export tracing, AOTInductor's compiles and single-threaded references.  One OpenMP thread per
# worker: two workers of two spinning threads each on two cores made the real-model tests up to 5x slower
# (the fitted-heads one 123 -> 645 s) and the suite barely faster.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
python -m pytest -n 2 --dist loadfile -ra --durations=15 "$@"
