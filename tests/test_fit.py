"""pipeline.cluster's fit against what the cluster is and can become, without Ray: the
advice names only flags that fit, an autoscaling cluster is waited for, an ask that no
node type can ever meet is refused naming what is missing, and the deploy manifests'
runs are waited for, not refused."""

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.autoscaler import STATIC, Autoscaler, InfeasibleLog, NodeType, node_types, v2_state
from pipeline.cluster import (
    Fit,
    ResourcesError,
    Wait,
    fit,
    infeasible_message,
    plan,
    timeout_message,
    wait_line,
)

DEPLOY = Path(__file__).parents[1] / "deploy"
HEAD = {"CPU": 0}  # a head that runs no work
CPU2 = NodeType("cpu", {"CPU": 2, "GPU": 0}, max_workers=2)


def scaler(*types: NodeType, **state) -> Autoscaler:
    return Autoscaler(types=list(types), source="test config", **state)


def flags(message: str) -> list[tuple[int | None, float | None, float | None]]:
    """The (actors, cpus per actor, gpus per actor) each piece of advice names."""
    found = []
    for actors in re.findall(r"--actors (\d+)", message):
        found.append((int(actors), None, None))
    for cpus in re.findall(r"--cpus-per-actor ([\d.]+)\)", message):
        found.append((None, float(cpus), None))
    for gpus in re.findall(r"--gpus-per-actor ([\d.]+)", message):
        found.append((None, None, float(gpus)))
    return found


def assert_advice_fits(nodes, message, actors, cpus, gpus):
    """Every flag the message advises makes the run fit `nodes`."""
    advised = flags(message)
    for a, c, g in advised:
        placed = fit(nodes, a or actors, c if c is not None else cpus, g if g is not None else gpus)
        assert isinstance(placed, Fit)
    return advised


def test_static_refusal_advises_only_what_fits():
    # two 1-CPU nodes, two 1-CPU actors: no CPU left for tasks
    nodes = [{"CPU": 1}, {"CPU": 1}]
    with pytest.raises(ResourcesError) as err:
        plan(nodes, STATIC, 2, 1.0, None)
    assert str(err.value) == (
        "the 2 labeling actor(s) take every CPU of the cluster (2 node(s): 1 CPU/0 GPU, "
        "1 CPU/0 GPU: 2 x 1 CPU), and the read, decode and write tasks need CPU beside them. "
        "Use --actors 1 or a smaller --cpus-per-actor (e.g. --cpus-per-actor 0.5), or add nodes."
    )
    assert assert_advice_fits(nodes, str(err.value), 2, 1.0, None) == [
        (1, None, None),
        (None, 0.5, None),
    ]


def test_static_head_without_cpus_is_not_told_to_use_one_actor():
    with pytest.raises(ResourcesError) as err:
        plan([HEAD], STATIC, 2, 1.0, None)
    message = str(err.value)
    assert "can place 0" in message and "--actors 1" not in message
    assert message.endswith("No smaller run fits either: add nodes.")


def test_static_gpu_ask_on_cpus_advises_cpu_labeling():
    nodes = [{"CPU": 4}]
    with pytest.raises(ResourcesError) as err:
        plan(nodes, STATIC, 1, 1.0, 1.0)
    assert "--gpus-per-actor 0 (label on CPUs)" in str(err.value)
    assert_advice_fits(nodes, str(err.value), 1, 1.0, 1.0)


def test_fits_now_needs_no_autoscaler():
    placed = plan([HEAD, {"CPU": 2}, {"CPU": 2}], scaler(CPU2), 2, 1.0, None)
    assert placed == Fit(2, 1.0, 0.0, 1.0)


def test_autoscaling_from_zero_waits_for_the_actors_and_task_cpu():
    waited = plan([HEAD], scaler(CPU2), 2, 1.0, None)
    assert isinstance(waited, Wait)
    assert waited.bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert "can place 0" in waited.reason
    # one worker up: two actors would take all of its CPUs; still waiting
    assert isinstance(
        plan([HEAD, {"CPU": 2}], scaler(CPU2, workers=Counter(cpu=1)), 2, 1.0, None), Wait
    )


def test_gpu_types_make_gpu_actors_the_default():
    gpu = NodeType("gpu", {"CPU": 2, "GPU": 1}, max_workers=2)
    waited = plan([HEAD], scaler(gpu), 2, 1.0, None)
    assert isinstance(waited, Wait) and waited.gpus_per_actor == 1.0
    assert waited.bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0}]


def test_gpus_on_a_cluster_without_gpu_types_never_fit():
    with pytest.raises(ResourcesError) as err:
        plan([HEAD], scaler(CPU2), 2, 1.0, 1.0)
    message = str(err.value)
    assert "no node of the cluster (1 node(s): 0 CPU/0 GPU) and the node types" in message
    assert "has GPUs" in message and "cpu: up to 2 x 2 CPU/0 GPU" in message
    assert "--gpus-per-actor 0" in message


def test_more_cpus_per_actor_than_any_type_has_never_fits():
    with pytest.raises(ResourcesError) as err:
        plan([HEAD], scaler(CPU2), 1, 4.0, None)
    message = str(err.value)
    assert "has more than 2 CPU" in message
    assert_advice_fits([HEAD, {"CPU": 2}, {"CPU": 2}], message, 1, 4.0, 0.0)


def test_more_actors_than_max_workers_allow_never_fit():
    with pytest.raises(ResourcesError) as err:
        plan([HEAD], scaler(CPU2), 5, 1.0, None)
    message = str(err.value)
    assert "can never hold them" in message and "--actors 3" in message
    assert_advice_fits([HEAD, {"CPU": 2}, {"CPU": 2}], message, 5, 1.0, 0.0)


def test_workers_already_up_and_the_cluster_cap_limit_what_may_be_added():
    nodes = [HEAD, {"CPU": 2}, {"CPU": 2}]
    with pytest.raises(ResourcesError):  # both workers of the type are up: none more
        plan(nodes, scaler(CPU2, workers=Counter(cpu=2)), 4, 1.0, None)
    big = NodeType("cpu", {"CPU": 2, "GPU": 0}, max_workers=10)
    with pytest.raises(ResourcesError):  # the type allows 10, the cluster 1
        plan([HEAD], scaler(big, max_workers=1), 2, 1.0, None)
    assert isinstance(plan([HEAD], scaler(big, max_workers=2), 2, 1.0, None), Wait)


def test_unknown_node_types_wait():
    assert isinstance(plan([HEAD], Autoscaler(types=None), 2, 1.0, 1.0), Wait)
    detected = NodeType("gpu", None, max_workers=8)  # resources: {} in the config
    assert isinstance(plan([HEAD], scaler(detected), 2, 1.0, 1.0), Wait)


def test_infeasible_reports_name_the_bundle():
    waited = plan([HEAD], Autoscaler(types=None), 2, 1.0, 1.0)
    assert infeasible_message(waited, Autoscaler(types=None, infeasible=[{"CPU": 2.0}])) is None
    reported = Autoscaler(types=None, infeasible=[{"CPU": 1.0, "GPU": 1.0}])
    message = infeasible_message(waited, reported)
    assert message.startswith(
        "the autoscaler reports that no node type can fulfill 1 CPU/1 GPU (a labeling actor)"
    )


def test_v1_infeasible_log_lines_are_parsed(tmp_path):
    log = tmp_path / "monitor.log"
    log.write_text("earlier: No available node types can fulfill resource request {'GPU': 8.0}.\n")
    reader = InfeasibleLog()
    reader.path, reader.offset = str(log), log.stat().st_size
    with log.open("a") as f:
        f.write(
            "2026-12-07 12:00:00,000\tINFO autoscaler.py:1 -- Error: No available node types "
            "can fulfill resource request {'CPU': 1.0, 'GPU': 1.0}. Add suitable node types to "
            "this cluster to resolve this issue.\n"
        )
    assert reader.read() == [{"CPU": 1.0, "GPU": 1.0}]
    with log.open("a") as f:  # a line being written: read once it is whole
        f.write("Error: No available node types can fulfill resource request {'GPU': 2.0}")
    assert reader.read() == [{"CPU": 1.0, "GPU": 1.0}]
    with log.open("a") as f:
        f.write(". Add suitable node types.\n")
    assert reader.read() == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 2.0}]


def test_v2_autoscaler_state_is_read_from_its_reply():
    """A GetClusterStatusReply as the v2 autoscaler fills it (a real protobuf message)."""
    from ray.core.generated import autoscaler_pb2 as pb

    reply = pb.GetClusterStatusReply()
    state = reply.autoscaling_state
    state.pending_instance_requests.add(ray_node_type_name="gpu", count=2)
    state.failed_instance_requests.add(ray_node_type_name="gpu", reason="quota exceeded")
    constraint = state.infeasible_cluster_resource_constraints.add()
    constraint.resource_requests.add().request.resources_bundle.update({"GPU": 8.0})
    nodes = reply.cluster_resource_state.node_states
    nodes.add(ray_node_type_name="gpu", status=pb.NodeStatus.RUNNING)
    nodes.add(ray_node_type_name="gpu", status=pb.NodeStatus.DEAD)
    got = Autoscaler(types=None)
    v2_state(got, reply)
    assert got.launching == Counter(gpu=2) and got.workers == Counter(gpu=3)
    assert got.failures == ["gpu: quota exceeded"] and got.infeasible == [{"GPU": 8.0}]


def test_wait_line_and_timeout_say_what_is_needed_alive_and_coming():
    state = scaler(CPU2, workers=Counter(cpu=1), launching=Counter(cpu=1))
    waited = plan([HEAD], state, 2, 1.0, None)
    line = wait_line(waited, [HEAD], state, 31.2, 900)
    assert line == (
        "gemlabel: waiting for the cluster to grow (31 s of --scale-timeout 900): the run needs "
        "2 labeling actor(s) of 1 CPU/0 GPU and 1 CPU for tasks beside them; alive: 1 node(s): "
        "0 CPU/0 GPU; autoscaler (test config): it may add 1 worker(s) (cpu: up to 2 x 2 CPU/0 "
        "GPU), launching 1 x cpu"
    )
    failing = scaler(CPU2, failures=["cpu: quota exceeded"])
    assert line_ends(
        wait_line(waited, [HEAD], failing, 0, 900), "failing to launch: cpu: quota exceeded"
    )
    message = timeout_message(waited, [HEAD, {"CPU": 2}], state, 900)
    assert message.startswith(
        "the cluster did not grow to hold the run within --scale-timeout 900 s"
    )
    assert "--actors 1 fits the alive nodes now" in message


def line_ends(line: str, tail: str) -> bool:
    return line.endswith(tail)


def test_deploy_manifests_runs_are_waited_for_not_refused():
    """The manifests start with no GPU worker (minReplicas/min_workers 0) and ask for
    `--actors 4 --gpus-per-actor 1`: the fit waits for the autoscaler."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    for name, key in (("rayjob.yaml", ("spec", "rayClusterSpec")), ("raycluster.yaml", ("spec",))):
        manifest = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
        spec = manifest
        for part in key:
            spec = spec[part]
        cr = {"metadata": {"name": "gemlabel", "namespace": "default"}, "spec": spec}
        types, cap = node_types(_derive_autoscaling_config_from_ray_cr(cr))
        assert [(t.name, t.resources, t.max_workers) for t in types] == [
            ("gpu", {"CPU": 12.0, "GPU": 1.0}, 16)
        ]
        scaler = Autoscaler(types=types, max_workers=cap, source=name)
        assert isinstance(plan([HEAD], scaler, 4, 1.0, 1.0), Wait), name
        with pytest.raises(ResourcesError, match="--actors 16"):  # maxReplicas: 16
            plan([HEAD], scaler, 17, 1.0, 1.0)
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    types, cap = node_types(config)
    assert [t.name for t in types] == ["gpu"] and types[0].resources["GPU"] == 1
    assert isinstance(plan([HEAD], Autoscaler(types=types, max_workers=cap), 4, 1.0, 1.0), Wait)
    with pytest.raises(ResourcesError):  # 9 actors of 1 GPU: max_workers 8
        plan(
            [HEAD], Autoscaler(types=types, max_workers=cap, source="ray-cluster.yaml"), 9, 1.0, 1.0
        )


def test_tasks_ask_for_what_the_grown_cluster_leaves_them():
    waited = plan([HEAD], scaler(CPU2), 2, 1.5, None)
    assert waited.bundles == [{"CPU": 1.5}, {"CPU": 1.5}, {"CPU": 0.5}]


@pytest.mark.slow
def test_a_wait_without_capacity_ends_at_its_timeout_and_clears_its_request(ray_local):
    """On a real local Ray (no autoscaler: nothing comes), a wait says what it waits for
    at once, fails after --scale-timeout with the numbers, and leaves no request behind."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    from pipeline.cluster import cluster_nodes, wait_for_capacity

    nodes = cluster_nodes()
    config = ({"available_node_types": {"cpu": {"resources": {"CPU": 4}, "max_workers": 2}}}, "t")
    waited = plan(nodes, Autoscaler(types=[NodeType("cpu", {"CPU": 4}, 2)], source="t"), 8, 1.0, 0)
    lines = []
    with pytest.raises(ResourcesError) as err:
        wait_for_capacity(waited, 2, config, lines.append, poll=0.5)
    assert len(lines) == 1 and lines[0].startswith(
        "gemlabel: waiting for the cluster to grow (0 s of --scale-timeout 2): the run needs 8 "
        "labeling actor(s) of 1 CPU/0 GPU and 1 CPU for tasks beside them; alive: 1 node(s): "
        "4 CPU/0 GPU; autoscaler (t): it may add 2 worker(s)"
    )
    assert str(err.value).startswith(
        "the cluster did not grow to hold the run within --scale-timeout 2 s: the run needs 8"
    )
    assert str(err.value).endswith("--actors 3 fits the alive nodes now.")
    assert json.loads(_internal_kv_get(b"autoscaler_resource_request")) == []
