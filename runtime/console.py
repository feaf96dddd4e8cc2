"""The console scripts' entry points.

Each one hands Ctrl-C to run_command before it imports its command's module,
because that import pulls in torch and takes seconds: a Ctrl-C in those seconds
would otherwise end in a KeyboardInterrupt traceback instead of one line.
"""
from importlib import import_module

from .errors import run_command


def _command(prog, module):
    return run_command(prog, lambda: import_module(module).main())


def pop_export():
    return _command("pop-export", "pop.exporter.cli")


def pop_generate():
    return _command("pop-generate", "pop.runtime.cli")


def pop_analyze():
    return _command("pop-analyze", "pop.quality.analyze")


def pop_eval():
    return _command("pop-eval", "pop.quality.evaluate")


def pop_bench():
    return _command("pop-bench", "pop.bench.cli")
