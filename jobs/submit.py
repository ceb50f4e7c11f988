"""`gemlabel submit | status | logs | stop`: labeling runs as Ray jobs (the Ray Jobs API).

`gemlabel submit --address http://HEAD:8265 -- run INPUT... --out URL ...` checks the `run`
arguments with the real parser, then submits `python -m jobs.cli run ... --address auto`.
The runtime environment carries this checkout's code (`gem`, `pipeline`, `jobs` as
`py_modules`), so the cluster runs exactly the client's version; the cluster image supplies
the dependencies (deploy/Dockerfile), or `--pip` adds them. `--no-upload` uses the gemlabel
installed on the cluster instead. Credentials never travel with the job: URLs that embed
them and secret-looking `--env` names are refused; nodes read them from their own
environment (a Kubernetes Secret, instance roles, provider config).

The address comes from `--address`, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else
Ray's default (a local cluster's dashboard, or http://127.0.0.1:8265). It is checked
before anything is asked (at most DASHBOARD_TIMEOUT_S): a dashboard that does not answer
is one line naming the address tried and how to set it, never a wait or Ray's retries.
"""

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request

from jobs.run import parse_run_args
from pipeline.exit_codes import EXIT_FAILED, EXIT_OK
from pipeline.storage.credentials import HINT, SECRET_NAMES, refuse_credentials

PACKAGES = ("gem", "pipeline", "jobs")
DASHBOARD_TIMEOUT_S = 5.0  # the longest a command waits to learn that no dashboard answers
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # read in this order
ADDRESS_HINT = (
    "pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_API_SERVER_ADDRESS; "
    "RAY_ADDRESS is read too"
)


class DashboardError(ConnectionError):
    """No Ray dashboard answers at the address a job command was given."""


def package_dirs() -> list[str]:
    """The local directories of gemlabel's packages (what `py_modules` uploads), found
    without importing them (`gem` imports torch)."""
    import importlib.util

    return [os.path.dirname(importlib.util.find_spec(name).origin) for name in PACKAGES]


def _local_relative(value: str) -> bool:
    return "://" not in value and "::" not in value and not os.path.isabs(value)


def check_run_args(run_args: list[str], working_dir: str | None) -> None:
    """Parse `run_args` as `gemlabel run` would (a usage error exits 2 here, before anything
    is submitted); refuse embedded credentials, and relative local paths unless
    `working_dir` is uploaded (they would resolve in the job's directory on the head)."""
    if run_args[:1] != ["run"]:
        raise ValueError("expected `gemlabel submit [OPTIONS] -- run INPUT... --vocab ... --out`")
    config = parse_run_args(run_args)
    paths = [*config.inputs, config.vocab, config.out]
    refuse_credentials([*paths, config.pretrained])
    relative = [p for p in paths if _local_relative(p)]
    if relative and working_dir is None:
        raise ValueError(
            f"relative paths resolve on the cluster, not here: {', '.join(relative)}; pass "
            "absolute paths or URLs of storage the cluster shares, or --working-dir"
        )


def entrypoint(run_args: list[str]) -> str:
    """The job's shell command: `gemlabel run` connected to the job's own cluster."""
    args = list(run_args)
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    return shlex.join(["python", "-m", "jobs.cli", *args])


def runtime_env(
    upload: bool = True,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    env: list[str] | None = None,
) -> dict:
    """The job's runtime environment; `env` holds NAME=VALUE pairs (no secrets)."""
    spec: dict = {}
    if upload:
        spec["py_modules"] = package_dirs()
    if working_dir:
        spec["working_dir"] = working_dir
    if pip:
        spec["pip"] = list(pip)
    variables = {}
    for pair in env or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--env expects NAME=VALUE, got {pair!r}")
        if SECRET_NAMES.search(name):
            raise ValueError(f"--env {name}: secrets are refused on the command line; {HINT}")
        variables[name] = value
    if variables:
        spec["env_vars"] = variables
    return spec


def _address(explicit: str | None) -> tuple[str | None, str]:
    """The address a job command uses and where it came from (the flag, a variable, or
    None and 'default': Ray's own discovery)."""
    if explicit:
        return explicit, "--address"
    for name in ADDRESS_VARIABLES:
        if os.environ.get(name):
            return os.environ[name], name
    return None, "default"


def _probe(url: str, source: str) -> None:
    """GET `url`/api/version within DASHBOARD_TIMEOUT_S; DashboardError naming `url`."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/version", timeout=DASHBOARD_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        why = f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:
        why = str(getattr(err, "reason", err))
    raise DashboardError(f"no Ray dashboard answers at {url} ({source}: {why}); {ADDRESS_HINT}")


_RESOLVE = (
    "import sys; from ray.dashboard.utils import get_address_for_submission_client as get; "
    "print(get(sys.argv[1] or None))"
)


def _resolve(address: str | None, source: str) -> str:
    """The dashboard URL of `address`: an http(s) URL as it is; `auto`, a cluster address or
    a Ray Client address (or none: a local cluster) as Ray resolves it, in a child process
    given DASHBOARD_TIMEOUT_S (Ray retries for a minute and logs every try)."""
    if address and address.startswith(("http://", "https://")):
        return address
    shown = address or "a local Ray cluster"
    env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARIABLES}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RESOLVE, address or ""],
            capture_output=True,
            text=True,
            timeout=DASHBOARD_TIMEOUT_S,
            env={**env, "RAY_BACKEND_LOG_LEVEL": "fatal"},
        )
    except subprocess.TimeoutExpired:
        raise DashboardError(
            f"no Ray cluster answers at {shown} ({source}) within {DASHBOARD_TIMEOUT_S:.0f} s; "
            f"{ADDRESS_HINT}"
        ) from None
    lines = done.stdout.split()
    if done.returncode == 0 and lines:
        return lines[-1]
    if address is None:  # no cluster here: what Ray's job client tries without one
        return DEFAULT_DASHBOARD
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    why = errors[-1].strip() if errors else f"exit code {done.returncode}"
    raise DashboardError(f"no Ray cluster at {shown} ({source}: {why}); {ADDRESS_HINT}")


def _client(address: str | None):
    """A Ray job client of the dashboard at `address` (see `_address`), checked to answer
    (before Ray is imported)."""
    address, source = _address(address)
    url = _resolve(address, source)
    _probe(url, source)
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address: hand it
    # the URL checked above, so what was probed is what is asked
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    return JobSubmissionClient(url)


def _job_call(call, job: str):
    """`call(job)` on the job client; a job the cluster does not know is a ValueError."""
    try:
        return call(job)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise ValueError(f"no job {job!r} on this Ray cluster") from None
        raise


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a `gemlabel run` as a Ray job; print its id."""
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    check_run_args(run_args, args.working_dir)
    env = runtime_env(not args.no_upload, args.working_dir, args.pip, args.env)
    job = _client(args.address).submit_job(
        entrypoint=entrypoint(run_args),
        runtime_env=env,
        submission_id=args.submission_id,
        metadata={"tool": "gemlabel"},
    )
    print(job)
    print(
        f"follow: gemlabel logs {job} --follow; rerun the same submit to resume",
        file=sys.stderr,
    )
    return EXIT_OK


def _is_output(target: str) -> bool:
    """Whether `gemlabel status TARGET` names an output (a URL, a path with a slash, or an
    existing directory) rather than a job id."""
    return "://" in target or "/" in target or os.sep in target or os.path.isdir(target)


def _output_of(entrypoint: str) -> str | None:
    """The --out of a job's `gemlabel run` entrypoint, or None."""
    args = shlex.split(entrypoint or "")
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.partition("=")[2]
    return None


def cmd_status(args: argparse.Namespace) -> int:
    """Print how far a job or an output is. For an output (a path or URL): shards done,
    images ok / error, masks, the recent rate and ETA, the lock holder and its heartbeat,
    and its status (running, stalled, complete, incomplete, failed), read from the output
    alone. For a job id: Ray's state and message, then the same for the job's --out. Exit
    0 when it is running or complete (job: pending, running or succeeded), else 1."""
    if _is_output(args.target):
        from pipeline.tools.progress import output_progress

        progress = output_progress(args.target)
        print(json.dumps(progress.as_dict(), indent=2) if args.json else progress.format())
        return EXIT_OK if progress.status in ("running", "complete") else EXIT_FAILED
    info = _job_call(_client(args.address).get_job_info, args.target)
    from pipeline.tools.progress import output_progress

    state = info.status.value
    out = _output_of(info.entrypoint)
    progress, why = None, None
    if out is not None:
        try:
            progress = output_progress(out)
        except (ValueError, OSError) as err:  # not written yet, or not readable from here
            why = str(err)
    if args.json:
        record = {"job": args.target, "state": state, "message": info.message, "out": out}
        record["output"] = progress.as_dict() if progress else None
        print(json.dumps(record | {"output_error": why} if why else record, indent=2))
    else:
        print(f"{args.target}: {state}" + (f" ({info.message})" if info.message else ""))
        if progress is not None:
            print(progress.format())
        elif out is not None:
            print(f"{out}: no progress to show ({why})")
    return EXIT_FAILED if state in ("FAILED", "STOPPED") else EXIT_OK


async def _follow(client, job: str) -> None:
    async for lines in client.tail_job_logs(job):
        print(lines, end="", flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the job's logs; with --follow, until it ends, then exit 0 only if it succeeded."""
    client = _client(args.address)
    if not args.follow:
        print(_job_call(client.get_job_logs, args.job), end="")
        return EXIT_OK
    asyncio.run(_follow(client, args.job))
    status = client.get_job_status(args.job).value
    print(f"gemlabel: job {args.job} {status}", file=sys.stderr)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask the cluster to stop the job (rows written so far stay valid; resubmit to resume)."""
    stopped = _job_call(_client(args.address).stop_job, args.job)
    print(f"{args.job}: " + ("stopping" if stopped else "not running"))
    return EXIT_OK


def _address_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the Ray dashboard, e.g. http://HEAD:8265; default: RAY_API_SERVER_ADDRESS, "
        "then RAY_ADDRESS",
    )


def add_job_commands(subparsers) -> None:
    """Register `submit`, `status`, `logs` and `stop`."""
    p = subparsers.add_parser(
        "submit",
        help="submit `gemlabel run` to a Ray cluster (Ray Jobs API); prints the job id",
        description="Submit a labeling run as a Ray job: gemlabel submit [OPTIONS] -- run "
        "INPUT... --vocab URL --out URL [run options]. Inputs, vocabulary and output must be "
        "URLs or absolute paths the cluster can read; credentials come from the cluster's "
        "environment, never from here. Resubmitting the same run resumes it.",
    )
    _address_option(p)
    p.add_argument(
        "--no-upload",
        action="store_true",
        help="use the gemlabel installed on the cluster instead of uploading this checkout",
    )
    p.add_argument("--working-dir", help="local directory uploaded as the job's working directory")
    p.add_argument("--pip", action="append", help="pip requirement installed for the job")
    p.add_argument("--env", action="append", help="NAME=VALUE for the job (no secrets)")
    p.add_argument("--submission-id", help="the job id to use (default: Ray picks one)")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- run INPUT... [run options]")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser(
        "status",
        help="how far a job or an output is (shards, images, rate, ETA, lock, status)",
        description=cmd_status.__doc__,
    )
    _address_option(p)
    p.add_argument(
        "target",
        metavar="JOB|OUT",
        help="a job id that submit printed, or an output path or URL (a path with a '/')",
    )
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_status)
    for name, func, text in (
        ("logs", cmd_logs, "print a submitted job's logs"),
        ("stop", cmd_stop, "stop a submitted job"),
    ):
        p = subparsers.add_parser(name, help=text, description=func.__doc__)
        _address_option(p)
        p.add_argument("job", metavar="JOB", help="the job id that submit printed")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)
