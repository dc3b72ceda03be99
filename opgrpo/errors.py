"""Errors that end a command with a clear message instead of a traceback."""


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. Redis stayed down); a checkpoint was written first."""
