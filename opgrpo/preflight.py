"""Bounded waits and resource checks of the driver: nothing it asks of Ray waits forever.

- `unmet_requests`: the actors' summed Ray requests (CPU, GPU, custom resources) against what
  the cluster holds, each shortfall named by its config fields, so that a run (or an `opgrpo
  scale` request) the cluster can never place is refused in seconds instead of waiting.
- `wait_within` / `get_within`: `ray.wait` / `ray.get` with a deadline from the config; past
  it, `WaitTimeout` names the actor and what was awaited.

This module imports Ray lazily and nothing heavy: the control actor uses it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from opgrpo.errors import RunStopped

# (config section, number of actors, Ray resources of one actor)
Request = tuple[str, int, dict[str, float]]
_UNIT = {"learner": "rank"}  # what one actor of a section is called in messages
_EPS = 1e-9


class WaitTimeout(RunStopped):
    """The driver waited for an actor longer than the config allows; the run stops."""


class InfeasibleResources(ValueError):
    """The run asks Ray for more than the cluster holds."""


def actor_request(num_cpus: float, num_gpus: float, resources: dict[str, float] | None = None
                  ) -> dict[str, float]:
    """The Ray resources one actor asks for (zero amounts left out)."""
    out = {"CPU": float(num_cpus), "GPU": float(num_gpus), **(resources or {})}
    return {name: float(amount) for name, amount in out.items() if amount > 0}


def _field(section: str, resource: str) -> str:
    return {"CPU": f"{section}.num_cpus", "GPU": f"{section}.num_gpus"}.get(
        resource, f"{section}.resources.{resource}")


def _actors(section: str, count: int) -> str:
    unit = _UNIT.get(section, "actor")
    return f"{count} {unit}{'' if count == 1 else 's'}"


def unmet_requests(requests: Sequence[Request], cluster: dict[str, float],
                   nodes: Sequence[dict[str, float]] | None = None) -> list[str]:
    """What `requests` need beyond `cluster` (ray.cluster_resources()), one line per resource,
    naming the config fields that ask for it; and, given `nodes` (each alive node's
    resources), any section one of whose actors no single node can hold. [] = it fits."""
    asked: dict[str, list[tuple[str, int, float]]] = {}
    for section, count, per_actor in requests:
        for name, amount in per_actor.items():
            if count > 0 and amount > 0:
                asked.setdefault(name, []).append((section, count, amount))
    problems = []
    for name, parts in asked.items():
        total, have = sum(c * a for _, c, a in parts), float(cluster.get(name, 0.0))
        if total > have + _EPS:
            terms = " + ".join(f"{_field(s, name)} {a:g} x {_actors(s, c)}" for s, c, a in parts)
            problems.append(f"{name}: {total:g} asked ({terms}), the cluster has {have:g} "
                            f"(missing {total - have:g})")
    if nodes is not None and not problems:
        for section, count, per_actor in requests:
            if count > 0 and per_actor and not any(
                    all(node.get(k, 0.0) + _EPS >= v for k, v in per_actor.items())
                    for node in nodes):
                wanted = ", ".join(f"{_field(section, k)} {v:g}" for k, v in per_actor.items())
                problems.append(f"no node can hold one {_UNIT.get(section, 'actor')} of "
                                f"{section} ({wanted}): the cluster's resources are spread "
                                "over nodes that each have less")
    return problems


def cluster_view() -> tuple[dict[str, float], list[dict[str, float]]]:
    """(ray.cluster_resources(), the resources of each alive node)."""
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def check_requests(requests: Sequence[Request], what: str = "the run") -> None:
    """InfeasibleResources, naming each shortfall, when the connected Ray cluster cannot hold
    `requests` at all (busy resources are not counted against it: those are waited for)."""
    cluster, nodes = cluster_view()
    problems = unmet_requests(requests, cluster, nodes)
    if problems:
        raise InfeasibleResources(
            f"{what} asks Ray for more than the cluster has, so its actors could never be "
            "placed: " + "; ".join(problems) + ". Lower these fields, or add nodes (an "
            "autoscaling cluster: set run.check_cluster_resources false)")


def free_resources() -> str:
    """What the cluster has free now (CPU, GPU, custom resources), for messages."""
    import ray

    free = {k: v for k, v in ray.available_resources().items()
            if k not in ("memory", "object_store_memory") and not k.startswith("node:")}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(free.items())) or "nothing"


def wait_within(refs: Sequence, timeout_s: float, what: Callable[[int], str],
                setting: str) -> None:
    """Wait until every ref in `refs` is done (a value or an error), at most `timeout_s`;
    otherwise WaitTimeout naming the first one not done (`what(i)` describes refs[i]) and the
    config field `setting` that bounds the wait."""
    import ray

    refs = list(refs)
    if not refs:
        return
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        position = {ref: i for i, ref in enumerate(refs)}
        first = min(position[ref] for ref in pending)
        others = f" ({len(pending) - 1} more not done either)" if len(pending) > 1 else ""
        raise WaitTimeout(f"{what(first)} did not finish within {timeout_s:g} s "
                          f"({setting}){others}")


def get_within(refs, timeout_s: float, what: Callable[[int], str] | str, setting: str):
    """`ray.get(refs)` that waits at most `timeout_s` (see `wait_within`); `refs` is a list or
    one ObjectRef (then `what` may be a plain description)."""
    import ray

    single = isinstance(refs, ray.ObjectRef)
    describe = (lambda i: what) if isinstance(what, str) else what
    began = time.monotonic()
    wait_within([refs] if single else refs, timeout_s, describe, setting)
    left = max(1.0, timeout_s - (time.monotonic() - began))
    try:  # done, so this returns at once (unless a value must be reconstructed)
        return ray.get(refs, timeout=left)
    except ray.exceptions.GetTimeoutError:
        raise WaitTimeout(f"{describe(0)}: its result could not be fetched within "
                          f"{timeout_s:g} s ({setting})") from None
