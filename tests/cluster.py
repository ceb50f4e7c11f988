"""A real two-node Ray cluster on loopback, for tests/test_cluster.py.

`in_namespace(scenario, workdir)` runs this file as PID 1 of a private network, PID and
mount namespace (`unshare -n -p --fork --mount-proc`): Ray listens on 127.0.0.1 only, its
session files live on a tmpfs over /tmp/ray, and every process it starts ends with the
namespace. Inside, `main` starts a head node (`ray start --head`, resource `head`) and a
worker node (resource `worker`), each with NODE_CPUS logical CPUs (or the spec's
`node_cpus`), runs the scenario with the `gemlabel` CLI and writes `result.json` to `workdir`.

`workdir/spec.json` holds `run` (the `gemlabel run` arguments) and, for the scenario
`submit`, `auto_run` (a second run, made with `gemlabel run --address auto`). The scenario
`jobs` submits each of its `jobs` ({"name", "run", "timeout"}; "kill": the run's --out,
to SIGKILL a worker node that hosts a labeling actor once its first file exists;
"max_workers": the autoscaler's new cap, set once the job is submitted and any kill done)
in turn and follows it to its end, or stops it after its timeout.

With `autoscale` in the spec ({"worker_cpus", "max_workers"}), the cluster is an autoscaling
one the way `ray up` makes it, on Ray's fake multi-node provider: a head of 0 CPUs started
with `--autoscaling-config`, and no worker until the autoscaler adds them (worker raylets on
this machine, within seconds), 0..max_workers of `worker_cpus` CPUs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HEAD_PORT, DASHBOARD_PORT = 6390, 8265
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
NODE_CPUS = 3  # one labeling actor (2 CPUs) per node, 1 CPU left for read/decode/write
ACTOR_CPUS = 2
LABELER = "MapWorker(MapBatches(Labeler))"  # Ray Data's actor class for pipeline.stages.label
FAKE_NODES = False  # whether the workers are the fake autoscaler's (see kill_labeling_worker)
WORKERS: dict[str, subprocess.Popen] = {}  # node id -> the worker started by start_worker_node
BIN = Path(sys.executable).parent
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    # declare a killed node dead within seconds, not the default ~30 s
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def in_namespace(scenario: str, workdir: Path, timeout: float) -> dict:
    """Run `scenario` on a fresh two-node cluster in its own namespaces; its result.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | ENV
    cmd = [
        "unshare",
        "-n",
        "-p",
        "--fork",
        "--kill-child",
        "--mount-proc",
        sys.executable,
        __file__,
    ]
    with open(workdir / "cluster.log", "wb") as log:
        proc = subprocess.run(
            [*cmd, scenario, str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            cwd=Path(__file__).parents[1],
        )
    result = workdir / "result.json"
    assert proc.returncode == 0 and result.exists(), (workdir / "cluster.log").read_text()[-6000:]
    return json.loads(result.read_text())


def sh(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command; echo its output to this process's log."""
    print("$", " ".join(args), flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=os.environ)
    print(proc.stdout + proc.stderr, flush=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}")
    return proc


def autoscaling_config(workdir: Path, worker_cpus: float, max_workers: int) -> Path:
    """The fake multi-node provider's config: a 0-CPU head type, one worker type."""
    config = {
        "cluster_name": "gemlabel-test",
        "max_workers": max_workers,
        "idle_timeout_minutes": 5,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{HEAD_PORT}",  # the provider's default is port 6379
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu": {
                "resources": {"CPU": worker_cpus, "worker": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"},
        **{key: [] for key in ("initialization_commands", "setup_commands")},
        **{key: [] for key in ("head_setup_commands", "worker_setup_commands")},
        **{key: [] for key in ("head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
    }
    path = workdir / "autoscaling.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config, indent=2))
    return path


def allow_workers(config: Path, max_workers: int) -> None:
    """Change the autoscaling config's cap on workers (the autoscaler reads it each round).
    A killed fake node stays listed (its status tag is never "up-to-date", which the v1
    autoscaler's liveness check requires before it takes a node down), as a cloud may list
    a reclaimed instance for a while: one more allowed worker lets a replacement come."""
    settings = json.loads(config.read_text())
    settings["max_workers"] = max_workers
    settings["available_node_types"]["cpu"]["max_workers"] = max_workers
    config.write_text(json.dumps(settings, indent=2))


def start_autoscaling_head(config: Path) -> None:
    """`ray start --head --num-cpus 0 --autoscaling-config` as `ray up` runs it, with the
    fake provider (its nodes are processes of this machine: RAY_FAKE_CLUSTER). A worker
    that stops reporting is replaced after 5 s, not the default 30."""
    os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_HEARTBEAT_TIMEOUT_S="5")
    sh(
        "ray",
        "start",
        "--head",
        f"--port={HEAD_PORT}",
        "--num-cpus=0",
        '--resources={"head": 1}',
        f"--autoscaling-config={config}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        "--include-dashboard=true",
    )


def kill_fake_node(node_id: str) -> int:
    """SIGKILL every process of a fake provider's node (its raylet, agents and workers:
    they carry the node's id in their environment); how many."""
    mark = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
    killed = 0
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue
    return killed


def start_worker_node(cpus: float) -> subprocess.Popen:
    """A worker node in a PID namespace of its own: killing that namespace's init (see
    `kill_node`) kills every process of the node at once, as when a machine dies."""
    cmd = [
        "unshare",
        "-p",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "ray",
        "start",
        f"--address=127.0.0.1:{HEAD_PORT}",
        f"--num-cpus={cpus}",
        '--resources={"worker": 1}',
        "--block",
    ]
    return subprocess.Popen(cmd, env=os.environ)


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL the init of the node's PID namespace (the kernel kills the rest)."""
    children = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    node.wait(timeout=60)


def node_roles() -> dict[str, str]:
    """Alive node id -> "head" or "worker" (by their custom resource)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(
        address=DASHBOARD,
        filters=[("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,  # dead nodes are "missing" from the filtered list
    )
    return {
        n.node_id: "head" if "head" in n.resources_total else "worker"
        for n in nodes
        if {"head", "worker"} & set(n.resources_total)
    }


def wait_for_workers(n: int, timeout: float = 120) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            roles = node_roles()
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            roles = {}
        if len(roles) == n + 1:
            return roles
        time.sleep(1)
    raise RuntimeError(f"no {n} worker node(s) after {timeout} s")


def labeler_actors() -> list[tuple[str, str]]:
    """(node id, state) of every labeling actor the cluster has known."""
    from ray.util.state import list_actors

    actors = list_actors(address=DASHBOARD, filters=[("class_name", "=", LABELER)], limit=1000)
    return [(a.node_id, a.state) for a in actors]


def submit(run_args: list[str]) -> str:
    # start labeling once both actors are up, and give an actor only as many tasks as it
    # runs at once (Ray Data's default queues twice that), so that both nodes get work
    wait = "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S=600"
    in_flight = "RAY_DATA_ACTOR_DEFAULT_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR=1"
    cmd = ["gemlabel", "submit", "--address", DASHBOARD, "--env", wait, "--env", in_flight]
    cmd += ["--", "run", *run_args]
    return sh(*cmd).stdout.strip().splitlines()[-1]


def job_status(job: str) -> str:
    return sh("gemlabel", "status", "--address", DASHBOARD, job, check=False).stdout.split()[1]


def wait_for_files(out: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(list((out / "images").glob("*.parquet"))) < n:
        if time.time() > deadline:
            raise RuntimeError(f"no {n} images files in {out} after {timeout} s")
        time.sleep(0.05)


def scenario_submit(spec: dict) -> dict:
    """Submit, follow to the end, check status; then one run with `--address auto`."""
    started = time.time()
    job = submit(spec["run"])
    follow = sh("gemlabel", "logs", "--address", DASHBOARD, "--follow", job, check=False)
    seconds = time.time() - started
    actors = labeler_actors()
    auto = sh("gemlabel", "run", *spec["auto_run"], "--address", "auto", check=False)
    return {
        "job": job,
        "follow_rc": follow.returncode,
        "logs": follow.stdout,
        "status": job_status(job),
        "job_seconds": seconds,
        "actors": actors,
        "auto_rc": auto.returncode,
        "auto_output": auto.stdout + auto.stderr,
    }


def follow_job(job: str, timeout: float) -> dict:
    """Follow `job`'s logs to its end; past `timeout` seconds stop it (and wait until it has
    ended, so that the next job finds the cluster free) and say so."""
    from ray.job_submission import JobSubmissionClient

    started = time.time()
    cmd = ["gemlabel", "logs", "--address", DASHBOARD, "--follow", job]
    try:
        follow = sh(*cmd, check=False, timeout=timeout)
        logs, rc, timed_out = follow.stdout, follow.returncode, False
    except subprocess.TimeoutExpired:
        logs, rc, timed_out = "", None, True
    seconds = time.time() - started
    client = JobSubmissionClient(DASHBOARD)
    status_at_end = client.get_job_status(job).value  # before any stop
    if timed_out:
        client.stop_job(job)
        deadline = time.time() + 120
        while not client.get_job_status(job).is_terminal() and time.time() < deadline:
            time.sleep(1)
        logs = client.get_job_logs(job)
    status = sh("gemlabel", "status", "--address", DASHBOARD, job, check=False)
    return {
        "job": job,
        "follow_rc": rc,
        "timed_out": timed_out,
        "status_at_end": status_at_end,
        "seconds": seconds,
        "logs": logs,
        "status": status.stdout.split()[1],
        "status_output": status.stdout + status.stderr,
    }


def workers() -> list[str]:
    """The alive worker nodes."""
    return sorted(node for node, role in node_roles().items() if role == "worker")


def kill_labeling_worker(out: Path) -> dict:
    """Once `out` has its first images file, SIGKILL a worker node that hosts a labeling
    actor (a fake provider's node, or the one `start_worker_node` started)."""
    wait_for_files(out, 1)
    actors = labeler_actors()  # afterwards a restarted actor reports its new node
    alive = workers()
    victim = next(node for node, state in actors if state == "ALIVE" and node in alive)
    killed = kill_fake_node(victim) if FAKE_NODES else kill_node(WORKERS[victim])
    return {
        "victim": victim,
        "killed_processes": killed,
        "actors_at_kill": actors,
        "workers_at_kill": alive,
        "files_at_kill": len(list((out / "images").glob("*.parquet"))),
    }


def scenario_jobs(spec: dict) -> dict:
    """Submit each of the spec's jobs in turn; follow each to its end (or its timeout);
    with "kill", SIGKILL a labeling worker node mid-run."""
    results = {}
    for job in spec["jobs"]:
        started = time.time()
        before = workers()
        submitted = submit(job["run"])
        kill = kill_labeling_worker(Path(job["kill"])) if job.get("kill") else {}
        if "max_workers" in job:  # after the kill: room for a replacement, not for more
            allow_workers(Path(spec["workdir"], "autoscaling.json"), job["max_workers"])
        results[job["name"]] = follow_job(submitted, job["timeout"])
        results[job["name"]].update(
            kill,
            job_seconds=time.time() - started,  # submit included
            workers_before=before,
            workers_after=workers(),
        )
    return results


def scenario_kill(spec: dict, worker: subprocess.Popen) -> dict:
    """Submit; the moment the first images file exists, SIGKILL the worker node (and start
    no replacement); follow the job to its end."""
    from ray.job_submission import JobSubmissionClient

    out = Path(spec["out"])
    job = submit(spec["run"])
    wait_for_files(out, 1)
    actors_at_kill = labeler_actors()  # afterwards a restarted actor reports its new node
    kill_node(worker)
    files_at_kill = len(list((out / "images").glob("*.parquet")))
    status_at_kill = JobSubmissionClient(DASHBOARD).get_job_status(job).value
    follow = sh("gemlabel", "logs", "--address", DASHBOARD, "--follow", job, check=False)
    return {
        "job": job,
        "follow_rc": follow.returncode,
        "logs": follow.stdout,
        "status": job_status(job),
        "status_at_kill": status_at_kill,
        "files_at_kill": files_at_kill,
        "actors_at_kill": actors_at_kill,
    }


def main(scenario: str, workdir: str) -> None:
    global FAKE_NODES
    spec = json.loads(Path(workdir, "spec.json").read_text())
    cpus = spec.get("node_cpus", NODE_CPUS)
    os.environ.update(ENV)
    sh("ip", "link", "set", "lo", "up")
    os.makedirs("/tmp/ray", exist_ok=True)
    sh("mount", "-t", "tmpfs", "tmpfs", "/tmp/ray")
    if "autoscale" in spec:
        FAKE_NODES = True
        scale = spec["autoscale"]
        start_autoscaling_head(autoscaling_config(Path(workdir), **scale))
        wait_for_workers(0)
        try:
            result = scenario_jobs({**spec, "workdir": workdir})
        finally:  # what the autoscaler did, for the test's report
            shutil.copy("/tmp/ray/session_latest/logs/monitor.log", workdir)
        Path(workdir, "result.json").write_text(json.dumps(result, indent=2))
        return
    sh(
        "ray",
        "start",
        "--head",
        f"--port={HEAD_PORT}",
        f"--num-cpus={cpus}",
        '--resources={"head": 1}',
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        "--include-dashboard=true",
    )
    worker = start_worker_node(cpus)
    roles = wait_for_workers(1)
    WORKERS.update({node: worker for node, role in roles.items() if role == "worker"})
    if scenario == "submit":
        result = scenario_submit(spec)
    elif scenario == "jobs":
        result = scenario_jobs(spec)
    else:
        result = scenario_kill(spec, worker)
    result["roles"] = roles
    Path(workdir, "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
