"""Can a cluster ever run one trial? Decided before anything starts, from plain descriptions (no Ray here).

A trial asks for `resources.cpu` CPUs and `resources.gpu` GPUs, all on one node (Tune places a trial's
bundle on a single node). A cluster is described by the totals of its current nodes and by the node
types its autoscaler may add (KubeRay worker groups, with their maximum replicas). The answer is one of:

- it fits a current node: run now (the node may be busy, but it frees up as trials end);
- it fits only a node type the autoscaler can add (e.g. a GPU group with minReplicas: 0): accepted, and
  the sweep says what it waits for ("waiting for 1 GPU: the cluster is scaling up");
- nothing can ever hold it: bad input, naming the resource, the amount asked, the most any node has,
  and the fix.

orchestrator/sweep.py turns a running Ray cluster into a `Cluster` (ray.nodes(), the autoscaler's
node types) and calls `check_trial_fits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from orchestrator.spec import Resources, SpecError

# Ray's resource names -> the spec's field under `resources`.
SPEC_FIELDS = {"CPU": "cpu", "GPU": "gpu"}
_TOLERANCE = 1e-9  # fractions such as 0.1 GPU add up in floating point


class ResourcesError(SpecError):
    """A trial asks for more than any node of the cluster has or can be given; nothing is started."""


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can start: the resources of one such node and how many it may add."""

    resources: dict[str, float]
    max_workers: int


@dataclass(frozen=True)
class Cluster:
    """What a Ray cluster is made of: current nodes (their total resources, busy or not) and autoscaler
    node types by name. `local` is in-process Ray on this machine, which never grows."""

    nodes: list[dict[str, float]]
    node_types: dict[str, NodeType] = field(default_factory=dict)
    local: bool = False


@dataclass(frozen=True)
class Fit:
    """The verdict for a trial that can run: now, or once the autoscaler has added a node."""

    when: Literal["now", "after scale-up"]
    message: str = ""


def trial_request(resources: Resources) -> dict[str, float]:
    """The Ray resources one trial asks for, e.g. {"CPU": 1.0, "GPU": 1.0}; zero amounts left out."""
    request = {"CPU": resources.cpu, "GPU": resources.gpu}
    return {name: amount for name, amount in request.items() if amount > 0}


def check_trial_fits(request: dict[str, float], cluster: Cluster) -> Fit:
    """Fit("now") or Fit("after scale-up", message); ResourcesError when no node can ever hold the trial."""
    if any(_holds(node, request) for node in cluster.nodes):
        return Fit("now")
    growable = {} if cluster.local else {n: t for n, t in cluster.node_types.items() if t.max_workers > 0}
    for name, node_type in sorted(growable.items()):
        if _holds(node_type.resources, request):
            return Fit("after scale-up", _waiting_message(request, cluster.nodes, name))
    raise ResourcesError(_never_message(request, cluster, [t.resources for t in growable.values()]))


def _holds(node: dict[str, float], request: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) + _TOLERANCE >= amount for name, amount in request.items())


def _waiting_message(request: dict[str, float], nodes: list[dict[str, float]], node_type: str) -> str:
    """'waiting for 1 GPU: the cluster is scaling up (node type gpu-workers)': the resources no current
    node has enough of, or the whole request when each exists somewhere but never together."""
    short = {name: amount for name, amount in request.items() if not any(_holds(n, {name: amount}) for n in nodes)}
    return f"waiting for {_amounts(short or request)}: the cluster is scaling up (node type {node_type})"


def _never_message(request: dict[str, float], cluster: Cluster, growable: list[dict[str, float]]) -> str:
    candidates = cluster.nodes + growable
    for name, amount in request.items():
        most = max((node.get(name, 0.0) for node in candidates), default=0.0)
        if most + _TOLERANCE < amount:
            return _too_much_message(name, amount, most, cluster.local)
    # Each resource exists somewhere, but no single node has all of them.
    asked = ", ".join(f"resources.{_field(n)}={_number(a)}" for n, a in request.items())
    largest = "; ".join(_describe(node) for node in candidates[:3])
    return (
        f"{asked} must all be on one node, and no node has them together (nodes: {largest}); lower them to fit "
        f"one node, or add a node type that has them all"
    )


def _too_much_message(name: str, amount: float, most: float, local: bool) -> str:
    field_name = _field(name)
    asked = f"resources.{field_name}={_number(amount)}"
    if local:
        has = f"this machine has no {name}" if most == 0 else f"this machine has {_amounts({name: most})}"
        if name == "GPU" and most == 0:
            fix = "pass --address of a cluster with GPUs, or set resources.gpu: 0 in the spec"
        else:
            fix = f"pass --address of a cluster with larger nodes, or set resources.{field_name}: {_number(most)} or less in the spec"
        return f"{asked} but {has}: {fix}"
    has = f"no node of the cluster, current or one its autoscaler can add, has more than {_amounts({name: most})}"
    fix = f"set resources.{field_name}: {_number(most)} or less in the spec, or give the cluster a node type with {_amounts({name: amount})}"
    if most == 0:
        has = f"no node of the cluster, current or one its autoscaler can add, has a {name}"
        fix = f"set resources.{field_name}: 0 in the spec, or give the cluster a node type with {_amounts({name: amount})}"
    return f"{asked} but {has}: {fix}"


def _field(name: str) -> str:
    return SPEC_FIELDS.get(name, name)


def _number(amount: float) -> str:
    return f"{amount:g}"


def _amounts(request: dict[str, float]) -> str:
    """{"GPU": 1, "CPU": 4} -> '1 GPU and 4 CPUs'."""
    parts = [f"{_number(a)} {n}{'s' if a != 1 and n in SPEC_FIELDS else ''}" for n, a in request.items()]
    return " and ".join(parts)


def _describe(node: dict[str, float]) -> str:
    shown = {n: node.get(n, 0.0) for n in SPEC_FIELDS}
    return ", ".join(f"{_number(a)} {n}" for n, a in shown.items())


def this_machine(count_gpus: bool = True) -> Cluster:
    """In-process Ray: one node, this machine's CPUs and the GPUs torch sees; it never grows.
    `count_gpus=False` (a request without GPUs) leaves them uncounted, and torch not imported."""
    import os

    node = {"CPU": float(os.cpu_count() or 1)}
    if count_gpus:
        import torch

        node["GPU"] = float(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return Cluster(nodes=[node], local=True)
