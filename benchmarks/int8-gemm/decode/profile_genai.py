"""onnxruntime-genai's decode steps under ONNX Runtime's profiler: a copy of its export with `enable_profiling`
in genai_config.json, one prompt of --context random ids, then --steps greedy tokens; prints the profile's path.
Runs in the peer's virtualenv (scripts/genai_venv.sh); read the profile with pop's own table:

    .venv-genai/bin/python benchmarks/int8-gemm/decode/profile_genai.py artifacts/genai/gemma3-270m-int4 \
        --context 1024 --steps 32 --threads 2
    .venv/bin/python benchmarks/quantized/profile_decode.py - --profile PRINTED_PATH --steps 32
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an onnxruntime-genai export (pop-bench --peers genai-int4 builds one)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp())
    copy = work / "model"
    shutil.copytree(a.model, copy)
    config = json.loads((copy / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update(enable_profiling=str(work / "genai"), intra_op_num_threads=a.threads, inter_op_num_threads=1)
    (copy / "genai_config.json").write_text(json.dumps(config))
    model = og.Model(str(copy))
    params = og.GeneratorParams(model)
    total = a.context + a.steps
    params.set_search_options(max_length=total, min_length=total)  # no early stop, as pop-bench's peer
    generator = og.Generator(model, params)
    generator.append_tokens(np.random.default_rng(0).integers(100, 1000, a.context).astype(np.int32))
    wall = []
    for _ in range(a.steps):
        t = time.perf_counter()
        generator.generate_next_token()
        wall.append((time.perf_counter() - t) * 1e3)
    del generator, model  # ends the session, which writes the profile
    print(f"wall per token {np.median(wall):.2f} ms (profiler on)")
    print(next(work.glob("genai*.json")))


if __name__ == "__main__":
    main()
