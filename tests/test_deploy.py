"""deploy/: the KubeRay manifests and the cluster launcher YAML carry the fields KubeRay and
`ray up` require, their gemlabel commands parse with the real CLI parser (a renamed flag
fails here, not in a user's job), and the Dockerfile pins versions and runs as non-root."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser

DEPLOY = Path(__file__).parents[1] / "deploy"
KUBERAY = sorted((DEPLOY / "kuberay").glob("ray*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def gemlabel_commands(text: str) -> list[list[str]]:
    """The argument lists of every `gemlabel ...` command in a shell command line."""
    found = []
    for command in re.split(r"[;&|]+", text):
        words = shlex.split(command, comments=True)
        if words and words[0] == "gemlabel":
            found.append([w for w in words[1:] if w not in (">", "/dev/null")])
    return found


def assert_parses(args: list[str]) -> None:
    parsed = build_parser().parse_args(args)  # SystemExit(2) on a bad flag
    if parsed.command == "run" and not args[1:] == ["--help"]:
        from jobs.run import config_from_args

        config_from_args(parsed)  # values valid too


def test_manifests_found():
    assert {p.name for p in KUBERAY} == {"rayjob.yaml", "raycluster.yaml"}


def pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_cluster_spec(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayJob", "RayCluster") and doc["metadata"]["name"]
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay: strings
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for container in pod_containers(head) + [c for g in groups for c in pod_containers(g)]:
        assert container["name"] and container["image"].endswith(":0.1.0")  # pinned tag
        assert container["resources"]["requests"] and container["resources"]["limits"]
        secrets = [e["secretRef"]["name"] for e in container["envFrom"]]
        assert secrets == ["gemlabel-storage"]  # storage credentials from the Secret only
        assert not any("KEY" in e["name"] or "SECRET" in e["name"] for e in container["env"])
    gpus = [
        c["resources"][kind]["nvidia.com/gpu"]
        for g in groups
        for c in pod_containers(g)
        for kind in ("requests", "limits")
    ]
    assert gpus and all(int(n) >= 1 for n in gpus)
    assert "nvidia.com/gpu" not in str(pod_containers(head))


def test_rayjob_runs_gemlabel_to_completion():
    doc = load(DEPLOY / "kuberay" / "rayjob.yaml")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    commands = gemlabel_commands(spec["entrypoint"])
    assert len(commands) == 1 and commands[0][0] == "run"
    assert_parses(commands[0])
    args = build_parser().parse_args(commands[0])
    assert args.address == "auto" and args.gpus_per_actor == 1
    assert all("://" in path for path in [*args.inputs, args.vocab, args.out])  # shared storage
    workers = sum(g["maxReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert args.actors <= workers


def test_storage_secret_example():
    doc = load(DEPLOY / "kuberay" / "storage-secret.example.yaml")
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == "gemlabel-storage"
    assert set(doc["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert {v for k, v in doc["stringData"].items() if "AWS_" in k and "REGION" not in k} == {
        "REPLACE_ME"
    }


def test_cluster_launcher_yaml():
    doc = load(DEPLOY / "ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert doc[key]
    assert doc["provider"]["type"] and doc["head_node_type"] in doc["available_node_types"]
    assert doc["docker"]["image"].endswith(":0.1.0")
    workers = [t for n, t in doc["available_node_types"].items() if n != doc["head_node_type"]]
    assert workers and doc["max_workers"] >= max(t["max_workers"] for t in workers)
    for node_type in doc["available_node_types"].values():
        assert node_type["node_config"] and "resources" in node_type
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert isinstance(doc[key], list) and doc[key]
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in doc["worker_start_ray_commands"])
    commands = [c for line in doc["setup_commands"] for c in gemlabel_commands(line)]
    assert commands
    for args in commands:
        with pytest.raises(SystemExit) as exit_info:  # `--help` exits 0 after parsing
            assert_parses(args)
        assert exit_info.value.code == 0


def test_documented_submit_commands_parse():
    """The `gemlabel submit -- run ...` examples in the deploy files' comments."""
    found = 0
    for path in [*KUBERAY, DEPLOY / "ray-cluster.yaml"]:
        text = path.read_text()
        blocks = re.findall(r"\$\((gemlabel submit.*?)\)", text.replace("\\\n#", " "), re.S)
        for block in blocks:
            (args,) = gemlabel_commands(block)
            parsed = build_parser().parse_args(args)
            assert parsed.command == "submit" and parsed.run_args[:2] == ["--", "run"]
            assert_parses(parsed.run_args[1:])
            found += 1
    assert found == 2


def test_dockerfile_pins_and_runs_as_non_root():
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG BASE="))
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    install = next(line for line in lines if "pip install" in line)
    assert "-c constraints.txt" in install and "-c deploy/constraints.txt" in install
    pins = {}
    for name in ("constraints.txt", "deploy/constraints.txt"):
        text = (DEPLOY.parent / name).read_text()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                package, _, version = line.partition("==")
                assert version, f"{name}: {line} is not pinned"
                pins[package] = version
    assert {"torch", "ray", "open_clip_torch", "s3fs", "gcsfs"} <= set(pins)
    assert pins["torch"] == re.match(r"pytorch/pytorch:([\d.]+)", base).group(1)
    assert (
        pins["ray"]
        == load(DEPLOY / "kuberay" / "rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
    )
