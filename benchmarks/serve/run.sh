#!/usr/bin/env bash
# The commands behind benchmarks/serve/ (2 threads per server, a quiet machine; about 70 minutes).
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
# gemma3-270m again, POP and full only, at the rates where full mode's median TTFT doubles from idle
# (the first sweep stopped short of it)
pop-load artifacts/gemma3-270m-onnx-pop --systems pop,full --rates 0.5,0.6 --duration 45 \
  --json $OUT/gemma3-270m-high.json | tee $OUT/gemma3-270m-high.txt
# Ray Serve (pop-serve --ray, a local Ray instance each): 1 and 2 replicas of 1 thread against one
# pop-serve process of 2 threads
pop-load artifacts/smollm2-135m-onnx-pop --systems pop,ray-1,ray-2 --rates 0.25,0.5,0.8 --duration 30 \
  --json $OUT/smollm2-135m-ray.json --plot $OUT/smollm2-135m-ray.png | tee $OUT/smollm2-135m-ray.txt
# the Ray hop itself: one replica of one thread against pop-serve with one thread, short prompts
pop-load artifacts/smollm2-135m-onnx-pop --systems pop,ray-1 --threads 1 --rates 0.5 --duration 20 \
  --prompt-lens 16,32 --output-lens 16,32 --idle-prompts 20 \
  --json $OUT/smollm2-135m-ray-hop.json | tee $OUT/smollm2-135m-ray-hop.txt
