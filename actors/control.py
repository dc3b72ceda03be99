"""The small control actor of a run: what `opgrpo scale` asked for, and the current weights.

It lives in its own module, which imports nothing heavy, so that its actor process and the
`opgrpo scale` command start in a moment (the pools' module imports torch and diffusers).
"""

from __future__ import annotations

NAMESPACE = "opgrpo"


def control_name(run_name: str) -> str:
    return f"control:{run_name}"


class Control:
    """Holds what another shell asked for (`opgrpo scale`); the driver reads it each step.

    It also holds the current weights (an object ref and its version): a rollout actor that
    Ray restarts after a crash loads them in its constructor, before it takes any work.
    """

    def __init__(self) -> None:
        self.rollout: int | str | None = None
        self.weights: list = []  # [ObjectRef]: a list, so that Ray passes the ref, not the value
        self.version = -1

    def set_weights(self, weights: list, version: int) -> int:
        self.weights, self.version = weights, version
        return version

    def get_weights(self) -> tuple[list, int]:
        return self.weights, self.version

    def set_rollout(self, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"rollout actors must be >= 1 or 'auto', got {value!r}")
        self.rollout = value
        return value

    def status(self) -> tuple[int | str | None, int]:
        """The requested rollout size and the weight version held (-1 after a restart)."""
        return self.rollout, self.version

    def identity(self) -> dict:
        import os

        return {"pid": os.getpid()}
