"""Errors that end a command with a clear message instead of a traceback."""


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. Redis stayed down); a checkpoint was written first."""


class BufferMismatch(RunStopped):
    """On resume the replay buffer in Redis is not the one the checkpoint stored."""
