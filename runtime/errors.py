class PopError(Exception):
    """A user-facing failure: the CLIs print its message as one line and exit non-zero."""
