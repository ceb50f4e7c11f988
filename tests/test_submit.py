"""`gemlabel submit/status/logs/stop` without a cluster (a fake Jobs API client), and the
refusal of credentials in URLs by `submit` and `run`."""

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import jobs.submit
from jobs.cli import main
from pipeline.storage import output
from pipeline.storage.credentials import has_credentials, redact

SECRET = "wJalrXUtnFEMI"


class FakeClient:
    def __init__(self, address):
        self.address, self.submitted, self.stopped = address, [], []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return "raysubmit_test"

    entrypoint = "python -m jobs.cli run a.tar --vocab v.txt --out /nonexistent/out"

    def get_job_info(self, job):
        return SimpleNamespace(
            status=SimpleNamespace(value="FAILED"), message="boom", entrypoint=self.entrypoint
        )

    def stop_job(self, job):
        self.stopped.append(job)
        return True


@pytest.fixture
def client(monkeypatch):
    clients = []

    def make(address):
        clients.append(FakeClient(address))
        return clients[-1]

    monkeypatch.setattr(jobs.submit, "_client", make)
    return clients


def printed(capsys) -> list[str]:
    """The lines printed to stdout, without those Ray streams to this process's driver
    from its workers (a worker killed in another test may report here, late)."""
    lines = capsys.readouterr().out.splitlines()
    return [line for line in lines if not re.match(r"(\x1b\[\d+m)?\(", line)]


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", f"{tmp_path}/{{0..1}}.tar", "--vocab", f"{tmp_path}/v.txt", "--out", *extra]


def test_submit_sends_the_run_with_the_code(client, tmp_path, capsys):
    args = run_args(tmp_path, "s3://bucket/out", "--top-k", "3")
    code = main(
        ["submit", "--address", "http://head:8265", "--env", "HF_HUB_OFFLINE=1", "--", *args]
    )
    assert code == 0 and printed(capsys) == ["raysubmit_test"]
    (fake,) = client
    (job,) = fake.submitted
    assert fake.address == "http://head:8265"
    assert job["entrypoint"] == (
        f"python -m jobs.cli run '{tmp_path}/{{0..1}}.tar' --vocab {tmp_path}/v.txt "
        "--out s3://bucket/out --top-k 3 --address auto"
    )
    env = job["runtime_env"]
    assert [os.path.basename(p) for p in env["py_modules"]] == ["gem", "pipeline", "jobs"]
    assert all(os.path.isfile(os.path.join(p, "__init__.py")) for p in env["py_modules"])
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1"}


def test_submit_options_shape_the_runtime_env(client, tmp_path):
    args = run_args(tmp_path, "out", "--address", "ray://elsewhere:10001")
    opts = ["--no-upload", "--working-dir", str(tmp_path), "--pip", "s3fs", "--submission-id", "x"]
    assert main(["submit", *opts, "--", *args]) == 0
    (job,) = client[0].submitted
    assert job["runtime_env"] == {"working_dir": str(tmp_path), "pip": ["s3fs"]}
    assert job["submission_id"] == "x" and job["entrypoint"].endswith("ray://elsewhere:10001")


@pytest.mark.parametrize(
    "bad, message",
    [
        (["run", "a.tar", "--vocab", "/v", "--out", "/o"], "relative paths"),
        (["run", "/a.tar", "--vocab", "/v", "--out", f"s3://AKIA:{SECRET}@b/o"], "credentials"),
        (["run", f"https://h/a.tar?X-Amz-Signature={SECRET}", "--vocab=/v", "--out=/o"], "cred"),
        (["label", "/a.tar"], "expected `gemlabel submit"),
    ],
)
def test_submit_refuses_before_sending(client, capsys, bad, message):
    assert main(["submit", "--address", "http://h:8265", "--", *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and SECRET not in err and not client


def test_submit_refuses_secret_env(client, tmp_path, capsys):
    env = ["--env", f"AWS_SECRET_ACCESS_KEY={SECRET}"]
    assert main(["submit", *env, "--", *run_args(tmp_path, "/o")]) == 2
    err = capsys.readouterr().err
    assert "secrets are refused" in err and SECRET not in err and not client


def test_submit_usage_error_exits_2(client, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "--", *run_args(tmp_path, "/o", "--no-such-flag")])
    assert exit_info.value.code == 2 and not client


def test_status_and_stop(client, capsys, monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://env:8265")
    assert main(["status", "raysubmit_x"]) == 1  # FAILED
    assert main(["stop", "raysubmit_x"]) == 0
    out = capsys.readouterr().out
    assert "raysubmit_x: FAILED (boom)" in out and "raysubmit_x: stopping" in out
    assert client[1].stopped == ["raysubmit_x"]
    assert [c.address for c in client] == [None, None]  # Ray reads the env variables
    assert "/nonexistent/out: no progress to show (/nonexistent/out does not exist" in out


def test_status_of_a_job_shows_its_output(client, capsys, tmp_path, monkeypatch):
    """The job's --out, found in its entrypoint, read as `gemlabel status OUT` would."""
    out = tmp_path / "out"
    output.write_manifest(str(out), {"status": "complete", "totals": {"images": 7}, "shards": {}})
    monkeypatch.setattr(FakeClient, "entrypoint", f"python -m jobs.cli run a.tar --out={out}")
    assert main(["status", "raysubmit_x"]) == 1  # the job FAILED, whatever its output says
    text = capsys.readouterr().out
    assert f"raysubmit_x: FAILED (boom)\n{out}: complete\n  shards   0 / 0 done" in text
    assert main(["status", "raysubmit_x", "--json"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["state"] == "FAILED" and record["output"]["images"] == 7


def test_run_refuses_credentials_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", f"s3://AKIA:{SECRET}@bucket/a.tar", "--vocab", "/v.txt", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "credentials in URLs are refused" in err and SECRET not in err and "***@" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "url, redacted",
    [
        ("s3://AKIA:secret@bucket/x.tar", "s3://***@bucket/x.tar"),
        ("https://h/x.tar?X-Amz-Signature=abc&a=1", "https://h/x.tar?X-Amz-Signature=***&a=1"),
        ("https://acct.blob/x.tar?sv=1&sig=abc", "https://acct.blob/x.tar?sv=1&sig=***"),
        ("simplecache::s3://a:b@c/d", "simplecache::s3://***@c/d"),
        ("s3://bucket/x.tar", "s3://bucket/x.tar"),
        ("sftp://user@host/x.tar", "sftp://user@host/x.tar"),
        ("/data/a:b@c.tar", "/data/a:b@c.tar"),
    ],
)
def test_redact(url, redacted):
    assert redact(url) == redacted and has_credentials(url) == (url != redacted)
