#!/usr/bin/env bash
# The commands behind benchmarks/serve/ (2 threads per server, a quiet machine; about 45 minutes).
# Each pop-load starts its servers once and alternates them per rate on the same seeded arrivals.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/serve
for m in smollm2-135m gemma3-270m; do
  [ -d artifacts/$m-onnx-pop ] || pop-export --model $m
done
# POP, full and llama.cpp's server over a range of rates up to saturation
pop-load artifacts/smollm2-135m-onnx-pop --systems pop,full,llama.cpp --rates 0.15,0.3,0.5,0.8 --duration 40 \
  --json $OUT/smollm2-135m.json --plot $OUT/smollm2-135m.png | tee $OUT/smollm2-135m.txt
pop-load artifacts/gemma3-270m-onnx-pop --systems pop,full,llama.cpp --rates 0.08,0.16,0.25,0.4 --duration 45 \
  --json $OUT/gemma3-270m.json --plot $OUT/gemma3-270m.png | tee $OUT/gemma3-270m.txt
# continuous batching (4 rows) against one request at a time, both offered more than either can serve
pop-load artifacts/smollm2-135m-onnx-pop --systems pop,pop-serial --rates 1.5 --duration 25 \
  --json $OUT/smollm2-135m-batching.json | tee $OUT/smollm2-135m-batching.txt
pop-load artifacts/gemma3-270m-onnx-pop --systems pop,pop-serial --rates 0.6 --duration 30 \
  --json $OUT/gemma3-270m-batching.json | tee $OUT/gemma3-270m-batching.txt
