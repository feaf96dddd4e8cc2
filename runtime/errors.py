"""User-facing failures.  The commands report them as one line (pop.cli.console.run_command)."""


class PopError(Exception):
    """A user-facing failure: the CLIs print its message as one line and exit non-zero."""
