"""User-facing failures, and the one way every pop command reports them."""
import os
import signal
import sys


class PopError(Exception):
    """A user-facing failure: the CLIs print its message as one line and exit non-zero."""


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
