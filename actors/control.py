"""The small control actor of a run: what `opgrpo scale` asked for, and the current weights.

It lives in its own module, which imports nothing heavy, so that its actor process and the
`opgrpo scale` command start in a moment (the pools' module imports torch and diffusers).
"""

from __future__ import annotations

NAMESPACE = "opgrpo"


def control_name(run_name: str, run_id: str | None = None) -> str:
    """The control actor's Ray name: `control:<run name>:<run id>` (two runs with the same
    run.name on one cluster get their own); a run started before run ids, without one."""
    return f"control:{run_name}" if run_id is None else f"control:{run_name}:{run_id}"


class Control:
    """Holds what another shell asked for (`opgrpo scale`); the driver reads it each step.

    It also holds the current weights (an object ref and its version): a rollout actor that
    Ray restarts after a crash loads them in its constructor, before it takes any work.
    """

    def __init__(self) -> None:
        self.rollout: int | str | None = None
        self.weights: list = []  # [ObjectRef]: a list, so that Ray passes the ref, not the value
        self.version = -1
        # (the other actors' requests, one rollout actor's request): set by the driver so that
        # a size the cluster cannot hold is refused here, at once (None: not checked)
        self.limits: tuple[list, dict] | None = None

    def set_limits(self, others: list, per_rollout_actor: dict | None) -> None:
        """The Ray requests of the run's other actors (`opgrpo.preflight.Request`s) and of
        one rollout actor; None turns the check off (run.check_cluster_resources false)."""
        self.limits = None if per_rollout_actor is None else (others, per_rollout_actor)

    def set_weights(self, weights: list, version: int) -> int:
        self.weights, self.version = weights, version
        return version

    def get_weights(self) -> tuple[list, int]:
        return self.weights, self.version

    def set_rollout(self, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"rollout actors must be >= 1 or 'auto', got {value!r}")
        if value != "auto" and self.limits is not None:
            from opgrpo.preflight import InfeasibleResources, cluster_view, unmet_requests

            others, per_actor = self.limits
            problems = unmet_requests([("rollout", value, per_actor), *others],
                                      *cluster_view())
            if problems:
                raise InfeasibleResources(
                    f"rollout actors -> {value} refused, the cluster cannot hold them: "
                    + "; ".join(problems) + ". The run keeps its rollout actors")
        self.rollout = value
        return value

    def status(self) -> tuple[int | str | None, int]:
        """The requested rollout size and the weight version held (-1 after a restart)."""
        return self.rollout, self.version

    def identity(self) -> dict:
        import os

        return {"pid": os.getpid()}
