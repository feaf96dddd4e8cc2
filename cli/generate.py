"""pop-generate: generate text from an exported folder with the pop runtime."""
import argparse
import json
import sys

from pop.runtime.backends import BACKENDS
from pop.runtime.errors import PopError
from pop.runtime.sampling import Sampler
from pop.runtime.session import MODES, PopSession
from pop.runtime.vision import load_image

from .options import add_runtime


def _ids(text):
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--prompt-ids takes comma-separated integers, e.g. 1,2,3") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def parser():
    p = argparse.ArgumentParser(prog="pop-generate", description="Generate a continuation from pop artifacts.")
    p.add_argument("artifacts", help="a folder written by pop-export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (the tokenizer's BOS is added when the model wants one)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, comma-separated, used as given")
    src.add_argument("--prompt-file", metavar="FILE", help="prompt text read from a UTF-8 file")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image for a vision-language export (repeatable); the prompt becomes one chat turn "
                        "with the images before the text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the manifest's (64)")
    p.add_argument("--mode", default="pop", choices=MODES,
                   help="pop: shallow prefill; full: the whole model over the prompt (for comparison)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    add_runtime(p, BACKENDS)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--compare-modes", action="store_true",
                   help="after generating, time the first token of this prompt in POP and in full mode (median of "
                        "3 runs each, interleaved, after a warm-up) and print both")
    return p


def main(argv=None):
    return generate(parser().parse_args(argv))


def _read_prompt(path):
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise PopError(f"cannot read --prompt-file {path}: {e}") from None
    if not text.strip():
        raise PopError(f"--prompt-file {path} is empty")
    return text


def compare_modes(session, prompt, runs=3):
    """One line: the first token's latency on this prompt, POP against full mode (bench/measure.py's A/B)."""
    from pop.bench.measure import measure_runtime
    request = session.encode(prompt)
    r = measure_runtime(session, [request.rows[0]], 2, runs, 1)
    pop, full = r["pop_ttft"]["median"], r["full_ttft"]["median"]
    m = session.manifest.pop
    def ms(t):  # a tiny model's first token can take under a millisecond: keep a digit there
        return f"{t:.0f}" if t >= 10 else f"{t:.1f}"
    return (f"time to first token on this {r['prompt_tokens']}-token prompt (median of {runs}): POP "
            f"({m.prefill_layers} of {m.num_layers} layers in prefill) {ms(pop)} ms, full model {ms(full)} ms: "
            f"speedup {r['speedup']['median']:.2f}x")


def generate(args):
    if args.prompt_file is not None:
        args.prompt = _read_prompt(args.prompt_file)
    try:
        sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise PopError(str(e)) from None
    session = PopSession.load(args.artifacts, args.backend, threads=args.threads, prepack=args.prepack_weights,
                              tf32=args.tf32, prompt_chunk=args.prompt_chunk,
                              modes=MODES if args.compare_modes else (args.mode,))
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    images = None
    if args.image:
        if args.prompt is None:
            raise PopError("--image goes with --prompt (the chat template places the image before the text)")
        if session.mm is None:
            raise PopError(f"{args.artifacts} is a text-only export: --image needs a vision-language model")
        if args.compare_modes:
            raise PopError("--compare-modes times text prompts only")
        images = [load_image(path) for path in args.image]  # fail on a bad file before any work
    if args.prompt is not None and (args.chat or images):
        prompt = session.chat_prompt(args.prompt, len(images or []))
    max_new = args.max_new_tokens or session.manifest.generation.max_new_tokens
    if max_new < 1:
        raise PopError("--max-new-tokens must be at least 1")
    if args.json:
        g = session.generate(prompt, max_new, args.mode, sampler, stop_at_eos=not args.ignore_eos,
                             images=None if images is None else [images])
        print(json.dumps({"prompt_ids": g.prompt_ids[0], "output_ids": g.output_ids[0], "text": g.text[0],
                          "ttft_ms": g.ttft_ms, "decode_ms_per_token": g.decode_ms_per_token,
                          "finish_reason": g.finish_reasons[0], "mode": args.mode,
                          "prefill_layers": session.manifest.pop.prefill_layers,
                          "num_layers": session.manifest.pop.num_layers, **g.timings_ms}))
    else:
        pieces = session.stream(prompt, max_new, args.mode, sampler, stop_at_eos=not args.ignore_eos,
                                images=images)
        # the generator checks the prompt only when it starts: take the first piece
        # before echoing, so a rejected prompt prints nothing to stdout
        first = next(pieces, "")
        if args.prompt is not None and prompt == args.prompt and args.prompt_file is None:
            print(args.prompt, end="", flush=True)  # a prompt file is the user's to read, not echoed
        print(first, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    if args.compare_modes:
        print(compare_modes(session, prompt))


if __name__ == "__main__":
    from .console import run_command
    sys.exit(run_command("pop-generate", main))
