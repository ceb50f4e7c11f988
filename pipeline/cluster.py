"""What a run asks of the Ray cluster: the fit checked before the stream starts, and the
progress the driver watches while it runs.

- `fit`: the labeling actors (actors x CPUs/GPUs each) are placed on the nodes as Ray
  spreads them; the read, decode and write tasks need CPU beside them on some node. A run
  that cannot be placed stops at once with the numbers and the flag to change; one whose
  tasks find less than a whole CPU beside the actors is fitted (its tasks ask for what is
  left) and says so. Without this, Ray Data waits forever for a CPU that never frees.
- `Progress`: a zero-CPU actor that read tasks and labeling actors tick and that collects
  the shards' stats as readers finish them (so the driver need not read them back). The
  driver ends a stream that made no progress for `--stall-timeout` seconds.
"""

import math
import time
from dataclasses import dataclass

import ray

TASK_CPUS = 1.0  # what Ray Data's read and map tasks ask for by default


class ResourcesError(ValueError):
    """The run asks for more than the cluster has."""


@dataclass(frozen=True)
class Fit:
    """How a run is placed: actors, their resources, and the CPUs each task asks for."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    task_cpus: float
    message: str = ""  # what was adjusted, for the user


def _describe(nodes: list[dict]) -> str:
    shapes = [f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes]
    return f"{len(nodes)} node(s): " + ", ".join(shapes)


def fit(
    nodes: list[dict], actors: int | None, cpus_per_actor: float, gpus_per_actor: float | None
) -> Fit:
    """Place the run on `nodes` (each a Ray resources dict: CPU, GPU). `actors` None: one
    per GPU, or 1 without GPUs; `gpus_per_actor` None: 1 when the cluster has GPUs.
    Raises ResourcesError (numbers and flags in the message) when it cannot fit."""
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if total_gpus > 0 else 0.0)

    def room(node: dict) -> int:
        limits = [node.get("CPU", 0) / cpus_per_actor if cpus_per_actor > 0 else math.inf]
        limits.append(node.get("GPU", 0) / gpus if gpus > 0 else math.inf)
        value = min(limits)
        return int(value + 1e-9) if value != math.inf else 1 << 30

    capacity = sum(room(n) for n in nodes)
    wanted = actors or (max(1, int(total_gpus // gpus)) if gpus > 0 else 1)
    if wanted > capacity:
        raise ResourcesError(
            f"the run asks for {wanted} labeling actor(s) of {cpus_per_actor:g} CPU and "
            f"{gpus:g} GPU each, but the cluster ({_describe(nodes)}) can place {capacity}. "
            f"Use --actors {max(capacity, 1)}"
            + (" or fewer --gpus-per-actor" if gpus > 0 else "")
            + " or a smaller --cpus-per-actor, or add nodes."
        )
    free = [n.get("CPU", 0) for n in nodes]
    free_gpus = [n.get("GPU", 0) for n in nodes]
    for _ in range(wanted):  # spread: each actor on the node with the most CPU left
        hosts = [
            i
            for i in range(len(nodes))
            if free[i] >= cpus_per_actor - 1e-9 and free_gpus[i] >= gpus - 1e-9
        ]
        best = max(hosts, key=lambda i: free[i])
        free[best] -= cpus_per_actor
        free_gpus[best] -= gpus
    spare = max(free, default=0.0)
    if spare < 0.01:
        fewer = f"--actors {wanted - 1}" if wanted > 1 else "a node with more CPUs"
        raise ResourcesError(
            f"the {wanted} labeling actor(s) take every CPU of the cluster ({_describe(nodes)}: "
            f"{wanted} x {cpus_per_actor:g} CPU), and the read, decode and write tasks need CPU "
            f"beside them. Use {fewer} or a smaller --cpus-per-actor (e.g. "
            f"--cpus-per-actor {cpus_per_actor / 2:g}), or add nodes."
        )
    task_cpus = min(TASK_CPUS, math.floor(spare * 100) / 100)
    message = ""
    if task_cpus < TASK_CPUS:
        message = (
            f"fitted to the cluster ({_describe(nodes)}): the {wanted} labeling actor(s) hold "
            f"{wanted * cpus_per_actor:g} CPU, so read, decode and write tasks ask for "
            f"{task_cpus:g} CPU each"
        )
    return Fit(wanted, cpus_per_actor, gpus, task_cpus, message)


def cluster_nodes() -> list[dict]:
    """The resources of the alive nodes of the connected Ray cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def resource_summary() -> str:
    """Ray's view of the cluster now: resources in all and available, per kind."""
    total, available = ray.cluster_resources(), ray.available_resources()
    kinds = [k for k in ("CPU", "GPU", "memory", "object_store_memory") if k in total]

    def amount(kind: str, value: float) -> str:
        return f"{value / 2**30:.1f} GiB" if "memory" in kind else f"{value:g}"

    return "; ".join(
        f"{kind} {amount(kind, available.get(kind, 0))} free of {amount(kind, total[kind])}"
        for kind in kinds
    )


@ray.remote(num_cpus=0)
class Progress:
    """Ticked by the stages as they work; holds the stats of the shards read to their end."""

    def __init__(self):
        self.last = time.time()
        self.stats: list[dict] = []

    def tick(self) -> None:
        self.last = time.time()

    def shard_end(self, stats: dict) -> None:
        self.last = time.time()
        self.stats.append(stats)

    def poll(self) -> tuple[float, list[dict]]:
        """When a stage last made progress, and the shard stats that arrived since the last poll."""
        stats, self.stats = self.stats, []
        return self.last, stats
