"""The cluster's autoscaler as a run sees it: which worker types it may add (`Autoscaler`,
`autoscaling_config`), what it is doing (`read_autoscaler`: workers up and launching,
launches that failed, requests it reports infeasible), and the request for nodes
(`request`). Ray 2.60 keeps the node types in different places per setup:

- the cluster config in the GCS (`ray._private.state.state.get_cluster_config()`: None on
  open-source setups, which means unknown, not static);
- the `--autoscaling-config` of the autoscaler process (`monitor.py`) on the driver's
  machine (`ray up`, `ray start --head --autoscaling-config`); an autoscaler without one
  can add nothing;
- `~/ray_bootstrap_config.yaml` on a `ray up` head;
- on KubeRay, the RayCluster's worker groups (`AutoscalingConfigProducer`, with the head
  pod's service account, as the autoscaler sidecar reads them).
"""

import ast
import glob
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import ray
import yaml

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` leaves on the head
INFEASIBLE_V1 = re.compile(r"No available node types can fulfill resource request (\{[^}]*\})")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeType:
    """A kind of worker the autoscaler may add: its resources (None: detected when one
    starts, so unknown here) and how many of it the cluster may hold."""

    name: str
    resources: dict | None
    max_workers: int


@dataclass
class Autoscaler:
    """What the cluster's autoscaler may add and is doing. `types` None: unknown (no
    source could be read); empty: there is none (a static cluster)."""

    types: list[NodeType] | None
    max_workers: int | None = None  # the cluster's cap on workers of all types
    source: str = ""  # where the types were read
    workers: Counter = field(default_factory=Counter)  # type -> workers up or launching
    launching: Counter = field(default_factory=Counter)  # type -> workers being launched
    failures: list[str] = field(default_factory=list)  # launches that failed, and why
    infeasible: list[dict] = field(default_factory=list)  # bundles no node type can hold

    @property
    def static(self) -> bool:
        return self.types == []


STATIC = Autoscaler(types=[], source="no autoscaler")


def node_types(config: dict) -> tuple[list[NodeType], int | None]:
    """The worker types of an autoscaling config (`ray up`'s YAML, the monitor's
    --autoscaling-config, KubeRay's derived one) and its cap on workers."""
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = spec.get("resources")
        known = resources is not None and ("CPU" in resources or "GPU" in resources)
        types.append(
            NodeType(
                name,
                {k: float(resources.get(k, 0)) for k in ("CPU", "GPU")} if known else None,
                int(spec.get("max_workers", config.get("max_workers", 0)) or 0),
            )
        )
    cap = config.get("max_workers")
    return types, int(cap) if cap is not None else None


def _gcs_address() -> str:
    return ray._private.worker.global_worker.node.gcs_address


def _monitor_config() -> tuple[dict | None, str]:
    """The --autoscaling-config of the connected cluster's autoscaler when it runs on this
    machine ({} when it runs without one: nothing can be added), else None."""
    gcs = _gcs_address()
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") for a in args) or f"--gcs-address={gcs}" not in args:
            continue
        configs = [a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")]
        if not configs:
            return {}, "the autoscaler runs without an autoscaling config"
        with open(os.path.expanduser(configs[0])) as f:
            return yaml.safe_load(f) or {}, f"--autoscaling-config {configs[0]}"
    return None, ""


def _kuberay_config() -> tuple[dict | None, str]:
    """The RayCluster's worker groups, where this process runs in its pod (KubeRay sets
    RAY_CLUSTER_NAME) with the service account the autoscaler uses."""
    name = os.environ.get("RAY_CLUSTER_NAME")
    namespace_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if not name or not os.path.exists(namespace_file):
        return None, ""
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    with open(namespace_file) as f:
        namespace = f.read().strip()
    return AutoscalingConfigProducer(name, namespace)(), f"RayCluster {namespace}/{name}"


def _gcs_config() -> tuple[dict | None, str]:
    """The cluster config stored in the GCS (None on open-source setups)."""
    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return None, ""
    types = {
        g.name: {"resources": dict(g.resources), "max_workers": g.max_count}
        for g in config.node_group_configs
    }
    return {"available_node_types": types}, "the cluster config in the GCS"


def _bootstrap_config() -> tuple[dict | None, str]:
    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return None, ""
    with open(path) as f:
        return yaml.safe_load(f) or {}, BOOTSTRAP_CONFIG


def autoscaling_config() -> tuple[dict | None, str]:
    """The connected cluster's autoscaling config and where it was read; (None, "") when
    no source answers (unknown: not the same as a cluster without an autoscaler)."""
    for source in (_gcs_config, _monitor_config, _bootstrap_config, _kuberay_config):
        try:
            config, where = source()
        except Exception as err:  # noqa: BLE001 - a source that fails is one that says nothing
            logger.debug("gemlabel: %s: %s", source.__name__, err)
            continue
        if config is not None:
            return config, where
    return None, ""


def _v1_report() -> dict:
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(status).get("autoscaler_report") or {} if status else {}


class InfeasibleLog:
    """The v1 autoscaler's infeasible reports ("No available node types can fulfill
    resource request {...}") written to its log on this machine after this was made."""

    def __init__(self):
        self.path, self.offset, self.found = None, 0, []
        try:
            logs = ray._private.worker._global_node.get_logs_dir_path()
            self.path = os.path.join(logs, "monitor.log")
            self.offset = os.path.getsize(self.path)
        except Exception:  # noqa: BLE001 - no log here: the timeout still ends the wait
            self.path = None

    def read(self) -> list[dict]:
        """Every request reported infeasible since this was made."""
        if self.path is None:
            return self.found
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.found
        end = data.rfind(b"\n") + 1  # whole lines only: the rest is read next time
        self.offset += end
        text = data[:end].decode(errors="replace")
        self.found += [ast.literal_eval(m.group(1)) for m in INFEASIBLE_V1.finditer(text)]
        return self.found


def v2_state(scaler: Autoscaler, reply) -> None:
    """Fill `scaler` from the v2 autoscaler's GetClusterStatusReply: workers per type,
    launches pending and failed, and the requests it reports infeasible."""
    from ray.core.generated.autoscaler_pb2 import NodeStatus

    state = reply.autoscaling_state
    for request in state.pending_instance_requests:
        scaler.launching[request.ray_node_type_name] += request.count
    for instance in state.pending_instances:
        scaler.launching[instance.ray_node_type_name] += 1
    for failed in state.failed_instance_requests:
        scaler.failures.append(f"{failed.ray_node_type_name}: {failed.reason}")
    for constraint in state.infeasible_cluster_resource_constraints:
        for request in constraint.resource_requests:
            scaler.infeasible.append(dict(request.request.resources_bundle))
    for request in state.infeasible_resource_requests:
        scaler.infeasible.append(dict(request.request.resources_bundle))
    for node in reply.cluster_resource_state.node_states:
        if node.status != NodeStatus.DEAD:
            scaler.workers[node.ray_node_type_name] += 1
    scaler.workers.update(scaler.launching)


def _v2_status(scaler: Autoscaler) -> None:
    """Fill `scaler` from the v2 autoscaler's state in the GCS."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(_gcs_address()).get_cluster_status(timeout_s=10))
    v2_state(scaler, reply)


def read_autoscaler(
    config: tuple[dict | None, str], infeasible: InfeasibleLog | None = None
) -> Autoscaler:
    """The autoscaler as `config` (from `autoscaling_config`) and its live state describe it."""
    settings, source = config
    if settings is None:
        scaler = Autoscaler(types=None)
    else:
        types, cap = node_types(settings)
        scaler = Autoscaler(types=types, max_workers=cap, source=source)
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            _v2_status(scaler)
        else:
            report = _v1_report()
            scaler.workers.update(report.get("active_nodes") or {})
            for _, kind, _ in report.get("pending_nodes") or []:
                scaler.workers[kind] += 1
                scaler.launching[kind] += 1
            launches = report.get("pending_launches") or {}
            scaler.launching.update(launches)  # Counter.update adds
            scaler.workers.update(launches)
            scaler.failures += [f"{kind} ({ip})" for ip, kind in report.get("failed_nodes") or []]
            availability = (report.get("node_availability_summary") or {}).get(
                "node_availabilities"
            ) or {}
            for kind, record in availability.items():
                info = record.get("unavailable_node_information")
                if not record.get("is_available") and info:
                    scaler.failures.append(f"{kind}: {info.get('description', '')}")
    except Exception as err:  # noqa: BLE001 - the state is for the user; the timeout still holds
        logger.debug("gemlabel: autoscaler state: %s", err)
    if scaler.types is not None:  # workers only: the head is no worker of any type
        names = {t.name for t in scaler.types}
        scaler.workers = Counter({k: n for k, n in scaler.workers.items() if k in names})
        scaler.launching = Counter({k: n for k, n in scaler.launching.items() if k in names})
    if infeasible is not None:
        scaler.infeasible += infeasible.read()
    return scaler


def request(bundles: list[dict]) -> None:
    """Ask the autoscaler for `bundles` (replacing any earlier ask; [] clears it)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
