"""What a run asks of the Ray cluster: the fit checked before the stream starts, the wait
for an autoscaler to add what is missing, and what the driver watches while it runs.

- `fit`: the labeling actors (actors x CPUs/GPUs each) are placed on the nodes as Ray
  spreads them; the read, decode and write tasks need CPU beside them on some node. A run
  that cannot be placed stops at once with the numbers and the flags that would fit; one
  whose tasks find less than a whole CPU beside the actors is fitted (its tasks ask for
  what is left) and says so. Without this, Ray Data waits forever for a CPU that never frees.
- `plan`: the same against what the cluster can become. Where the autoscaler's node types
  are known (`Autoscaler`, read by `read_autoscaler`) and no mix of them can ever hold the
  run, it fails at once naming what is missing; where they can, or are unknown, the run
  waits (`wait_for_capacity`): it asks the autoscaler for the bundles (`request_resources`),
  prints what it waits for every REPORT_S, fails when the autoscaler reports the ask
  infeasible, and gives up after `--scale-timeout`. A static cluster is refused at once.
- `Progress`: a zero-CPU actor that read tasks and labeling actors tick and that collects
  the shards' stats as readers finish them, pinned to the driver's node (`start_progress`)
  so that losing any other node loses none of it. The driver ends a stream that made no
  progress for `--stall-timeout` seconds.
- `place`: `fit`, else `plan` and `wait_for_capacity`: what the run calls.
- `NodeWatch`: the nodes seen alive during the run, and which of them died.
The autoscaler's node types and state are read by pipeline.autoscaler.
"""

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from pipeline.autoscaler import (
    Autoscaler,
    InfeasibleLog,
    autoscaling_config,
    read_autoscaler,
    request,
)

TASK_CPUS = 1.0  # what Ray Data's read and map tasks ask for by default
SCALE_POLL_S = 5.0  # how often a wait looks at the cluster (and renews its request)
REPORT_S = 30.0  # how often a wait says what it waits for
IDLE_DRAIN = 4  # NodeDeathInfo.AUTOSCALER_DRAIN_IDLE: a node the autoscaler removed as idle
logger = logging.getLogger(__name__)


class ResourcesError(ValueError):
    """The run asks for more than the cluster has, or can ever have."""


@dataclass(frozen=True)
class Fit:
    """How a run is placed: actors, their resources, and the CPUs each task asks for."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    task_cpus: float
    message: str = ""  # what was adjusted, for the user


@dataclass(frozen=True)
class Wait:
    """A run the alive nodes cannot hold yet: what it waits for and asks the autoscaler."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    bundles: list[dict]
    reason: str  # why the alive nodes do not fit


def _shape(resources: dict | None) -> str:
    if resources is None:
        return "resources detected at launch"
    return f"{resources.get('CPU', 0):g} CPU/{resources.get('GPU', 0):g} GPU"


def _describe(nodes: list[dict]) -> str:
    return f"{len(nodes)} node(s): " + ", ".join(_shape(n) for n in nodes)


def _bundle(cpus: float, gpus: float) -> dict:
    return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def demand(
    actors: int, cpus_per_actor: float, gpus_per_actor: float, task_cpus: float = TASK_CPUS
) -> list[dict]:
    """The bundles a run asks the autoscaler for: one per labeling actor, one for a task."""
    return [_bundle(cpus_per_actor, gpus_per_actor)] * actors + [{"CPU": task_cpus}]


def _room(node: dict, cpus: float, gpus: float) -> int:
    """How many actors of `cpus` and `gpus` fit on `node`."""
    limits = [node.get("CPU", 0) / cpus if cpus > 0 else math.inf]
    limits.append(node.get("GPU", 0) / gpus if gpus > 0 else math.inf)
    value = min(limits)
    return int(value + 1e-9) if value != math.inf else 1 << 30


def _spare(nodes: list[dict], wanted: int, cpus: float, gpus: float) -> float | None:
    """The most CPU left on one node once `wanted` actors are spread (each on the node with
    the most CPU left), or None when they cannot all be placed."""
    if sum(_room(n, cpus, gpus) for n in nodes) < wanted:
        return None
    free = [n.get("CPU", 0) for n in nodes]
    free_gpus = [n.get("GPU", 0) for n in nodes]
    for _ in range(wanted):
        hosts = [
            i for i in range(len(nodes)) if free[i] >= cpus - 1e-9 and free_gpus[i] >= gpus - 1e-9
        ]
        best = max(hosts, key=lambda i: free[i])
        free[best] -= cpus
        free_gpus[best] -= gpus
    return max(free, default=0.0)


def _fits(nodes: list[dict], wanted: int, cpus: float, gpus: float) -> bool:
    spare = _spare(nodes, wanted, cpus, gpus)
    return spare is not None and spare >= 0.01


def _advice(nodes: list[dict], wanted: int, cpus: float, gpus: float) -> str:
    """The flags with which the run would fit on `nodes`: only ones that do."""
    options = []
    most = next((n for n in range(wanted - 1, 0, -1) if _fits(nodes, n, cpus, gpus)), 0)
    if most:
        options.append(f"--actors {most}")
    if cpus > 0:
        smaller = next((c for c in (cpus / 2, cpus / 4) if _fits(nodes, wanted, c, gpus)), None)
        if smaller is not None:
            options.append(f"a smaller --cpus-per-actor (e.g. --cpus-per-actor {smaller:g})")
    if gpus > 0:
        fewer = next((g for g in (gpus / 2, gpus / 4) if _fits(nodes, wanted, cpus, g)), None)
        if fewer is not None:
            options.append(f"fewer --gpus-per-actor (e.g. --gpus-per-actor {fewer:g})")
        elif _fits(nodes, wanted, cpus, 0.0):
            options.append("--gpus-per-actor 0 (label on CPUs)")
    if not options:
        return "No smaller run fits either: add nodes."
    return "Use " + " or ".join(options) + ", or add nodes."


def _default_gpus(nodes: list[dict], gpus_per_actor: float | None) -> float:
    if gpus_per_actor is not None:
        return gpus_per_actor
    return 1.0 if any(n.get("GPU", 0) > 0 for n in nodes) else 0.0


def _default_actors(nodes: list[dict], actors: int | None, gpus: float) -> int:
    if actors:
        return actors
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    return max(1, int(total_gpus // gpus)) if gpus > 0 else 1


def fit(
    nodes: list[dict], actors: int | None, cpus_per_actor: float, gpus_per_actor: float | None
) -> Fit:
    """Place the run on `nodes` (each a Ray resources dict: CPU, GPU). `actors` None: one
    per GPU, or 1 without GPUs; `gpus_per_actor` None: 1 when the cluster has GPUs.
    Raises ResourcesError (numbers and the flags that would fit) when it cannot fit."""
    gpus = _default_gpus(nodes, gpus_per_actor)
    wanted = _default_actors(nodes, actors, gpus)
    spare = _spare(nodes, wanted, cpus_per_actor, gpus)
    if spare is None:
        capacity = sum(_room(n, cpus_per_actor, gpus) for n in nodes)
        raise ResourcesError(
            f"the run asks for {wanted} labeling actor(s) of {cpus_per_actor:g} CPU and "
            f"{gpus:g} GPU each, but the cluster ({_describe(nodes)}) can place {capacity}. "
            + _advice(nodes, wanted, cpus_per_actor, gpus)
        )
    if spare < 0.01:
        raise ResourcesError(
            f"the {wanted} labeling actor(s) take every CPU of the cluster ({_describe(nodes)}: "
            f"{wanted} x {cpus_per_actor:g} CPU), and the read, decode and write tasks need CPU "
            "beside them. " + _advice(nodes, wanted, cpus_per_actor, gpus)
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


def can_become(nodes: list[dict], scaler: Autoscaler) -> list[dict] | None:
    """The alive nodes plus the workers the autoscaler is launching and every one it may
    still add (its types' max workers less those it has, within the cluster's cap; types
    that can hold a labeling actor first); None when that is unknown."""
    if scaler.types is None or any(t.resources is None for t in scaler.types):
        return None
    cap = math.inf if scaler.max_workers is None else scaler.max_workers
    cap -= sum(scaler.workers.values())
    grown = list(nodes)
    ranked = sorted(
        scaler.types, key=lambda t: (-t.resources.get("GPU", 0), -t.resources.get("CPU", 0))
    )
    for kind in ranked:
        more = min(max(kind.max_workers - scaler.workers.get(kind.name, 0), 0), max(cap, 0))
        grown += [dict(kind.resources)] * int(more + scaler.launching.get(kind.name, 0))
        cap -= more
    return grown


def _types(scaler: Autoscaler) -> str:
    if not scaler.types:
        return "none"
    kinds = [f"{t.name}: up to {t.max_workers} x {_shape(t.resources)}" for t in scaler.types]
    cap = f"; at most {scaler.max_workers} workers in all" if scaler.max_workers is not None else ""
    return ", ".join(kinds) + cap


def _never(
    nodes: list[dict], scaler: Autoscaler, grown: list[dict], wanted: int, cpus: float, gpus: float
) -> str:
    """Why no node the cluster has or may add can ever hold the run, and what would fit."""
    asks = f"the run asks for {wanted} labeling actor(s) of {cpus:g} CPU and {gpus:g} GPU each"
    where = (
        f"the cluster ({_describe(nodes)}) and the node types its autoscaler may add "
        f"({_types(scaler)}; read from {scaler.source})"
    )
    most_gpus = max((n.get("GPU", 0) for n in grown), default=0)
    most_cpus = max((n.get("CPU", 0) for n in grown), default=0)
    if gpus > 0 and most_gpus == 0:
        return (
            f"{asks}, but no node of {where} has GPUs. Use --gpus-per-actor 0 (label on CPUs), "
            "or add a node type with GPUs."
        )
    if gpus > most_gpus:
        return f"{asks}, but no node of {where} has more than {most_gpus:g} GPU. " + _advice(
            grown, wanted, cpus, gpus
        )
    if cpus > most_cpus:
        return f"{asks}, but no node of {where} has more than {most_cpus:g} CPU. " + _advice(
            grown, wanted, cpus, gpus
        )
    return (
        f"{asks}, but {where} can never hold them beside the read, decode and write tasks, "
        f"even with every worker the autoscaler may add ({_describe(grown)}). "
        + _advice(grown, wanted, cpus, gpus)
    )


def plan(
    nodes: list[dict],
    scaler: Autoscaler,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float | None,
) -> Fit | Wait:
    """`fit` on the alive `nodes`; where they cannot hold the run, what to wait for. Raises
    ResourcesError at once on a static cluster, or where the autoscaler's known node types
    can never hold it (naming what is missing)."""
    try:
        return fit(nodes, actors, cpus_per_actor, gpus_per_actor)
    except ResourcesError as err:
        if scaler.static:
            raise
        now = str(err)
    grown = can_become(nodes, scaler)
    gpus = _default_gpus(nodes if grown is None else grown, gpus_per_actor)
    wanted = _default_actors(nodes, actors, gpus)
    task_cpus = TASK_CPUS
    if grown is not None:
        try:  # the tasks ask for what the grown cluster leaves them
            task_cpus = fit(grown, wanted, cpus_per_actor, gpus).task_cpus
        except ResourcesError:
            raise ResourcesError(
                _never(nodes, scaler, grown, wanted, cpus_per_actor, gpus)
            ) from None
    bundles = demand(wanted, cpus_per_actor, gpus, task_cpus)
    return Wait(wanted, cpus_per_actor, gpus, bundles, now)


def infeasible_message(wait: Wait, scaler: Autoscaler) -> str | None:
    """The error when the autoscaler reports one of the run's bundles infeasible (no node
    type can ever hold it), else None."""
    ours = [b for b in wait.bundles if any(_same(b, bad) for bad in scaler.infeasible)]
    if not ours:
        return None
    what = ", ".join(
        f"{_shape(b)} ({'a labeling actor' if b in wait.bundles[:-1] else 'a task'})"
        for b in {json.dumps(b, sort_keys=True): b for b in ours}.values()
    )
    return (
        f"the autoscaler reports that no node type can fulfill {what} (the run asks for "
        f"{wait.actors} labeling actor(s) of {wait.cpus_per_actor:g} CPU and "
        f"{wait.gpus_per_actor:g} GPU each). Ask for what the cluster's node types have "
        "(--cpus-per-actor, --gpus-per-actor, --actors; `ray status` lists them), or add a "
        "node type that has it."
    )


def _same(bundle: dict, reported: dict) -> bool:
    keys = {k for k, v in {**bundle, **reported}.items() if v}
    return all(abs(bundle.get(k, 0) - reported.get(k, 0)) < 1e-6 for k in keys)


def _waiting_for(wait: Wait, nodes: list[dict], scaler: Autoscaler) -> str:
    """What a wait needs, what is alive, and what the autoscaler may add and is doing."""
    if scaler.types is None:
        may = "its node types are unknown"
    else:
        cap = math.inf if scaler.max_workers is None else scaler.max_workers
        more = sum(max(t.max_workers - scaler.workers.get(t.name, 0), 0) for t in scaler.types)
        more = min(more, max(cap - sum(scaler.workers.values()), 0))
        may = f"it may add {more:g} worker(s) ({_types(scaler)})"
    launching = ", ".join(f"{n} x {t}" for t, n in sorted(scaler.launching.items())) or "none"
    failing = "; failing to launch: " + "; ".join(scaler.failures) if scaler.failures else ""
    return (
        f"the run needs {wait.actors} labeling actor(s) of {wait.cpus_per_actor:g} CPU/"
        f"{wait.gpus_per_actor:g} GPU and {wait.bundles[-1]['CPU']:g} CPU for tasks beside "
        f"them; alive: {_describe(nodes)}; autoscaler ({scaler.source or 'unknown'}): {may}, "
        f"launching {launching}{failing}"
    )


def wait_line(
    wait: Wait, nodes: list[dict], scaler: Autoscaler, waited: float, timeout: float
) -> str:
    """One line on a wait: what the run needs, what is alive, what the autoscaler may add
    and is launching or failing to launch, and how long it will still wait."""
    return (
        f"gemlabel: waiting for the cluster to grow ({waited:.0f} s of --scale-timeout "
        f"{timeout:g}): {_waiting_for(wait, nodes, scaler)}"
    )


def timeout_message(wait: Wait, nodes: list[dict], scaler: Autoscaler, timeout: float) -> str:
    """The error when a wait ended without the capacity."""
    cpus, gpus = wait.cpus_per_actor, wait.gpus_per_actor
    most = next((n for n in range(wait.actors - 1, 0, -1) if _fits(nodes, n, cpus, gpus)), 0)
    fits = f" --actors {most} fits the alive nodes now." if most else ""
    return (
        f"the cluster did not grow to hold the run within --scale-timeout {timeout:g} s: "
        f"{_waiting_for(wait, nodes, scaler)}. Raise --scale-timeout, or check the "
        f"autoscaler (`ray status`).{fits}"
    )


# ---- reading the cluster


def cluster_nodes() -> list[dict]:
    """The resources of the alive nodes of the connected Ray cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def wait_for_capacity(
    wait: Wait,
    timeout: float,
    config: tuple[dict | None, str],
    say: Callable[[str], None],
    poll: float = SCALE_POLL_S,
) -> Fit:
    """Ask the autoscaler for `wait.bundles` and wait until the alive nodes hold the run;
    say what it waits for at once and every REPORT_S. Raises ResourcesError when the
    autoscaler reports the ask infeasible or `timeout` seconds pass. The ask is cleared
    when the wait ends (Ray Data asks for what the stream needs from then on)."""
    started = time.time()
    infeasible = InfeasibleLog()
    next_line = started
    refused = False  # the request could not be made (said once; the wait goes on)
    try:
        while True:
            try:
                request(wait.bundles)  # renewed: another requester may have replaced it
            except Exception as err:  # noqa: BLE001 - e.g. a Ray Client connection
                if not refused:
                    logger.warning("gemlabel: could not ask the autoscaler for nodes: %s", err)
                refused = True
            nodes = cluster_nodes()
            try:
                return fit(nodes, wait.actors, wait.cpus_per_actor, wait.gpus_per_actor)
            except ResourcesError:
                pass
            scaler = read_autoscaler(config, infeasible)
            bad = infeasible_message(wait, scaler)
            if bad:
                raise ResourcesError(bad)
            waited = time.time() - started
            if waited >= timeout:
                raise ResourcesError(timeout_message(wait, nodes, scaler, timeout))
            if time.time() >= next_line:
                say(wait_line(wait, nodes, scaler, waited, timeout))
                next_line += REPORT_S
            time.sleep(min(poll, max(timeout - waited, 0.1)))
    finally:
        try:
            request([])
        except Exception as err:  # noqa: BLE001 - a stale ask only keeps nodes up longer
            logger.warning("gemlabel: could not clear the request to the autoscaler: %s", err)


def place(
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float | None,
    scale_timeout: float,
    static: bool,
    say: Callable[[str], None],
) -> Fit:
    """The run's placement on the connected cluster: `fit` on the alive nodes; where they
    cannot hold it, `plan` against what the autoscaler may add, and wait for it
    (`wait_for_capacity`, saying what it waits for). `static`: nothing can add nodes (an
    embedded local Ray). Raises ResourcesError for what cannot or did not come."""
    nodes = cluster_nodes()
    try:
        return fit(nodes, actors, cpus_per_actor, gpus_per_actor)
    except ResourcesError:
        if static:
            raise
    config = autoscaling_config()
    placed = plan(nodes, read_autoscaler(config), actors, cpus_per_actor, gpus_per_actor)
    if isinstance(placed, Wait):
        placed = wait_for_capacity(placed, scale_timeout, config, say)
    return placed


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


# ---- while the run streams


@ray.remote(num_cpus=0)
class Progress:
    """Ticked by the stages as they work; holds the stats of the shards read to their end.
    A shard reported again (its read task re-ran after a node was lost) is counted in
    `reread`, its stats kept once."""

    def __init__(self):
        self.last = time.time()
        self.stats: list[dict] = []
        self.reported: set[str] = set()
        self.reread = 0

    def tick(self) -> None:
        self.last = time.time()

    def shard_end(self, stats: dict) -> None:
        self.last = time.time()
        if stats["shard"] in self.reported:
            self.reread += 1
            return
        self.reported.add(stats["shard"])
        self.stats.append(stats)

    def poll(self) -> tuple[float, list[dict]]:
        """When a stage last made progress, and the shard stats that arrived since the last poll."""
        stats, self.stats = self.stats, []
        return self.last, stats

    def rereads(self) -> int:
        """Shards whose reading ended more than once."""
        return self.reread


def start_progress():
    """A Progress actor on the driver's node (which the run cannot outlive anyway), so
    that no other node's loss takes it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    return Progress.options(scheduling_strategy=strategy).remote()


class NodeWatch:
    """The nodes seen alive while a run streams; `lost()`: those of them dead now, but for
    the ones the autoscaler removed because they were idle (they held no work)."""

    def __init__(self, every: float = 5.0):
        self.every, self.seen, self.checked = every, set(), 0.0
        self.poll()

    def poll(self) -> None:
        """Note the alive nodes (at most every `every` seconds)."""
        if time.time() - self.checked >= self.every:
            self.checked = time.time()
            self.seen |= {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def lost(self) -> list[str]:
        """The nodes seen alive that died with work (not drained as idle)."""
        idle = {"AUTOSCALER_DRAIN_IDLE", IDLE_DRAIN}
        dead = {
            n["NodeID"] for n in ray.nodes() if not n["Alive"] and n.get("DeathReason") not in idle
        }
        return sorted(self.seen & dead)
