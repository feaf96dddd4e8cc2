"""pop-load: pop-serve (and llama.cpp's server) under a seeded Poisson load of real-text prompts.

    pop-load artifacts/smollm2-135m-onnx-pop --systems pop,full,llama.cpp --rates 0.2,0.4,0.8 \
        --json load.json --plot load.png
"""
import argparse
import sys

from pop.bench import serving
from pop.runtime.errors import PopError

from .console import progress_printer


def _floats(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--rates takes comma-separated numbers, e.g. 0.2,0.5") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("--rates needs positive request rates")
    return sorted(values)


def _range(name):
    def parse(text):
        try:
            lo, hi = (int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes MIN,MAX tokens, e.g. 128,2048") from None
        if not 1 <= lo <= hi:
            raise argparse.ArgumentTypeError(f"{name} needs 1 <= MIN <= MAX")
        return lo, hi
    return parse


def parser():
    p = argparse.ArgumentParser(prog="pop-load", description="Time to first token and throughput of pop-serve "
                                "(POP and full mode) and llama.cpp's server under Poisson traffic.")
    p.add_argument("artifacts", help="a folder written by pop-export")
    p.add_argument("--systems", default="pop,full",
                   help=f"comma-separated, run alternately on the same arrivals: {', '.join(serving.SYSTEMS)} "
                        "(default pop,full)")
    p.add_argument("--rates", type=_floats, default=[0.1, 0.2, 0.4], help="offered requests per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate (default 60)")
    p.add_argument("--prompt-lens", type=_range("--prompt-lens"), default=(128, 2048),
                   help="prompt tokens, log-uniform between MIN,MAX (default 128,2048)")
    p.add_argument("--output-lens", type=_range("--output-lens"), default=(16, 128),
                   help="generated tokens, uniform between MIN,MAX (default 16,128)")
    p.add_argument("--max-batch", type=int, default=4, help="pop-serve's rows (the -serial systems use 1)")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads of every server (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idle-prompts", type=int, default=12, help="prompts of the idle pass (one at a time)")
    p.add_argument("--text", default="../shared/data/text", help="folder of .txt files that prompts are cut from")
    p.add_argument("--gguf", default=None, help="llama.cpp's model (default: the GGUF the artifacts came from)")
    p.add_argument("--llamacpp-python", default=None,
                   help="python of llama.cpp's virtualenv (default: made by scripts/llamacpp_venv.sh)")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report here")
    p.add_argument("--plot", default=None, help="write TTFT p50/p99 and throughput against rate here (PNG)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    if a.max_batch < 1 or a.threads < 1 or a.duration <= 0 or a.idle_prompts < 1:
        raise PopError("need --max-batch, --threads, --idle-prompts >= 1 and --duration > 0")
    options = serving.LoadOptions(
        a.artifacts, [s.strip() for s in a.systems.split(",") if s.strip()], a.rates, a.duration, a.prompt_lens,
        a.output_lens, a.max_batch, a.max_queue, a.threads, a.seed, a.idle_prompts, a.text, a.gguf,
        a.llamacpp_python, " ".join(["pop-load", *argv]))
    report = serving.run_load(options, progress_printer("pop-load"))
    print(serving.table(report))
    serving.write(report, a.json_out, a.plot)
    return 0
