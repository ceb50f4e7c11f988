"""deploy/: the KubeRay manifests and the cluster launcher YAML carry the fields KubeRay and
`ray up` require, their gemlabel commands parse with the real CLI parser (a renamed flag
fails here, not in a user's job), and the Dockerfile pins versions and runs as non-root."""

import fnmatch
import json
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


# --- non-root image and pods, build context, cloud permissions ---------------------------

REPO = DEPLOY.parent


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        line.strip() for line in text.splitlines() if line.strip() and not line.strip()[0] == "#"
    ]


def image_user() -> tuple[int, int]:
    """The uid and gid of the Dockerfile's final USER, which must name them by number: the
    kubelet refuses a user *name* under `runAsNonRoot: true` (it cannot check it is not 0)."""
    users = [line.split(None, 1)[1] for line in dockerfile_lines() if line.startswith("USER ")]
    assert users, "the image runs as root"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER {users[-1]} is not numeric uid:gid"
    return int(match.group(1)), int(match.group(2))


def test_dockerfile_user_is_numeric_and_exists():
    uid, gid = image_user()
    assert uid != 0 and gid != 0  # neither root nor root's group
    # the user is created with those ids, so it has a home and a passwd entry
    creates = [line for line in dockerfile_lines() if "useradd" in line]
    assert creates
    useradd = shlex.split(creates[-1].split("useradd", 1)[1].split("&&")[0])
    assert useradd[useradd.index("--uid") + 1] == str(uid)
    assert useradd[useradd.index("--gid") + 1] == str(gid)


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template of a RayCluster or RayJob, by where it sits."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        pods[f"worker {group['groupName']}"] = group["template"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["submissionMode"] == "K8sJobMode"  # a submitter pod exists
        pods["submitter"] = doc["spec"]["submitterPodTemplate"]
    return pods


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_run_as_the_image_user(path):
    uid, gid = image_user()
    doc = load(path)
    for where, template in pod_templates(doc).items():
        pod = template["spec"]
        context = pod.get("securityContext") or {}
        assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
        for key, want in (("runAsUser", uid), ("runAsGroup", gid)):
            value = context.get(key)
            assert type(value) is int and value == want, f"{where}: {key} {value!r} != {want}"
        if pod.get("volumes"):
            assert context.get("fsGroup") == gid, f"{where}: volumes not writable by {gid}"
        for container in pod["containers"]:
            own = container.get("securityContext") or {}
            assert own.get("runAsNonRoot", True) is True and own.get("runAsUser", uid) == uid
            assert own.get("privileged", False) is False
            assert own.get("allowPrivilegeEscalation") is False, f"{where}: {container['name']}"
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    sidecar = spec["autoscalerOptions"].get("securityContext") or {}  # in the head pod
    assert sidecar.get("runAsUser", uid) == uid and sidecar.get("runAsNonRoot", True) is True
    assert sidecar.get("allowPrivilegeEscalation") is False, "autoscaler sidecar"


def test_rayjob_submitter_is_a_valid_job_pod():
    doc = load(DEPLOY / "kuberay" / "rayjob.yaml")
    pod = doc["spec"]["submitterPodTemplate"]["spec"]
    assert pod["restartPolicy"] == "Never"  # a Job's pod; KubeRay's default template's too
    (container,) = pod["containers"]
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"]  # same Ray version as the cluster
    assert "command" not in container  # KubeRay fills in `ray job submit ... -- entrypoint`
    assert container["resources"]["requests"] and container["resources"]["limits"]


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (exclude?, regex) pairs, with Docker's rules: a pattern is a path
    relative to the context root (a leading or trailing `/` is dropped), `*` and `?` stay
    within one path segment, `**` spans any number of them, `!` re-includes."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((exclude, re.compile(regex)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether `path` (relative, `/`-separated) is left out of the build context: the last
    pattern matching it or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exclude, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            result = exclude
    return result


def copied_files() -> list[str]:
    """Every file of the repository that the Dockerfile's COPY lines send to the image
    (bytecode caches aside: the build does not need them)."""
    files = []
    for line in dockerfile_lines():
        if not line.startswith("COPY "):
            continue
        words = [w for w in line.split()[1:] if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in line.split())  # all from the context
        for source in words[:-1]:
            path = REPO / source
            assert path.exists(), f"COPY {source}: not in the repository"
            found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            files += [
                p.relative_to(REPO).as_posix()
                for p in found
                if "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
    return files


def test_dockerignore_matcher_follows_docker_rules():
    """The test's own matcher against patterns whose Docker meaning is documented."""
    rules = [(True, re.compile(r)) for r in (r"out", r"(?:.*/)?__pycache__", r"[^/]*\.md")]
    assert ignored("out/demo/images/a.parquet", rules) and not ignored("gem/out/a", rules)
    assert ignored("__pycache__/a.pyc", rules) and ignored("gem/eval/__pycache__/a.pyc", rules)
    assert ignored("README.md", rules) and not ignored("docs/scaling.md", rules)
    assert not ignored("outside/a", rules)


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = dockerignore_patterns()
    files = copied_files()
    assert {"pyproject.toml", "README.md", "deploy/constraints.txt"} <= set(files)
    assert "gem/weights/gemlabel-toy.pt" in files  # package data, not just .py
    dropped = [f for f in files if ignored(f, patterns)]
    assert not dropped, f".dockerignore drops files the Dockerfile copies: {dropped[:5]}"


def test_dockerignore_leaves_out_environments_outputs_and_history():
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so",
        "out/demo/images/part-0.parquet",
        "out/demo/gallery/index.html",
        ".git/objects/pack/pack-1.pack",
        ".git/HEAD",
        "gemlabel.egg-info/PKG-INFO",
        "gem/__pycache__/model.cpython-312.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
    ):
        assert ignored(path, patterns), f"{path} is sent to the docker build"


def iam_policy(name: str) -> list[dict]:
    doc = json.loads((DEPLOY / name).read_text())
    assert doc["Version"] == "2012-10-17"
    for statement in doc["Statement"]:
        assert statement["Effect"] == "Allow" and statement["Action"] and statement["Resource"]
    return doc["Statement"]


def actions(statements: list[dict], resource: str | None = None) -> set[str]:
    """The actions allowed (on `resource`, when given: matched against the policy's
    wildcards)."""
    found = set()
    for statement in statements:
        names, resources = statement["Action"], statement["Resource"]
        names = [names] if isinstance(names, str) else names
        resources = [resources] if isinstance(resources, str) else resources
        if resource is None or any(fnmatch.fnmatchcase(resource, r) for r in resources):
            found |= set(names)
    return found


def test_launcher_policy_covers_the_cluster_launcher():
    statements = iam_policy("iam-launcher-policy.json")
    assert {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceTypes",  # worker resources detected from the instance type
        "ec2:CreateTags",
        "ec2:DescribeSubnets",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeImages",
        "ec2:DescribeKeyPairs",
        "iam:PassRole",
    } <= actions(statements)
    # every instance profile in ray-cluster.yaml: its role (same name) may be passed to EC2
    cluster = load(DEPLOY / "ray-cluster.yaml")
    profiles = {
        t["node_config"]["IamInstanceProfile"]["Name"]
        for t in cluster["available_node_types"].values()
    }
    assert len(profiles) == 2  # workers do not get the head's launch permissions
    for profile in profiles:
        role = f"arn:aws:iam::ACCOUNT_ID:role/{profile}"
        assert "iam:PassRole" in actions(statements, role), f"cannot pass role {profile}"


def test_node_policy_covers_reads_writes_and_the_lock():
    statements = iam_policy("iam-node-policy.json")
    entrypoint = load(DEPLOY / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"]
    args = build_parser().parse_args(gemlabel_commands(entrypoint)[0])

    def arn(url: str) -> str:  # a brace range stands for its first shard
        return "arn:aws:s3:::" + re.sub(r"\{(\w+)\.\.\w+\}", r"\1", url.split("://", 1)[1])

    bucket = arn(args.out).split("/")[0]
    assert "s3:ListBucket" in actions(statements, bucket)  # scans, resume, the lock's listing
    for url in [*args.inputs, args.vocab]:
        assert "s3:GetObject" in actions(statements, arn(url)), url
    out = arn(args.out) + "/images/part-0.parquet"
    # results are PUT; the lock is a conditional PUT (If-None-Match: *); stale claims and
    # leftovers are deleted; resume reads what is there
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions(statements, out)


def test_permissions_are_documented():
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    page = (REPO / "docs" / "cluster.md").read_text()
    for name in ("iam-launcher-policy.json", "iam-node-policy.json"):
        assert f"deploy/{name}" in text and name in page
    assert "**Permissions.**" in page and "iam:PassRole" in page
    assert "docs/cluster.md" in (REPO / "README.md").read_text()
