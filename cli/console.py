"""The console scripts' entry points, and the one way every pop command reports failure.

Each entry point hands Ctrl-C to run_command before it imports its command's
module, because that import pulls in torch and takes seconds: a Ctrl-C in those
seconds would otherwise end in a KeyboardInterrupt traceback instead of one line.
"""
import os
import signal
import sys
from importlib import import_module

from pop.runtime.errors import PopError


def run_command(prog, body):
    """Run body() for a console script: PopError -> one line, exit 2; Ctrl-C -> exit 130.

    Unexpected exceptions also get one line (the traceback with POP_DEBUG=1).
    Ctrl-C is remembered, because libraries such as torch.onnx and onnxruntime
    re-wrap the KeyboardInterrupt they receive into their own exception types,
    which our guards may turn into a PopError in turn.
    """
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(True)
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return body() or 0
    except BaseException as e:  # noqa: BLE001 - the last line of defence of a CLI
        # Checked before PopError: a Ctrl-C inside a guarded import (onnxruntime's
        # C extension turns it into "ImportError: initialization failed") must not
        # read as a missing dependency.
        if interrupted or isinstance(e, KeyboardInterrupt):
            print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
            return 130
        if isinstance(e, PopError):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, SystemExit):
            raise
        if os.environ.get("POP_DEBUG"):
            raise
        print(f"{prog}: failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
              f"(set POP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)


def progress_printer(prog):
    """Progress lines on stderr, prefixed with the command's name."""
    return lambda msg: print(f"{prog}: {msg}", file=sys.stderr, flush=True)


def _command(prog, module):
    return run_command(prog, lambda: import_module(module).main())


def pop_export():
    return _command("pop-export", "pop.cli.export")


def pop_generate():
    return _command("pop-generate", "pop.cli.generate")


def pop_analyze():
    return _command("pop-analyze", "pop.cli.analyze")


def pop_eval():
    return _command("pop-eval", "pop.cli.eval")


def pop_bench():
    return _command("pop-bench", "pop.cli.bench")


def pop_serve():
    return _command("pop-serve", "pop.cli.serve")


def pop_load():
    return _command("pop-load", "pop.cli.load")
