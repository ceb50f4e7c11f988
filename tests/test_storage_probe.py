"""An object-store output that cannot be used is one line, at once, before Ray starts:
wrong or missing credentials, an endpoint that does not answer, a bucket that does not
exist (pipeline.storage.credentials.check_writable, on SeaweedFS and fake-gcs-server)."""

import time
import uuid

import fsspec
import pytest

from jobs.cli import main
from pipeline.storage.credentials import StorageAccessError, check_writable
from pipeline.storage.store import Store
from tests.object_stores import free_ports
from tests.shards import write_good_shards

BOUND_S = 15  # the probe answers within this, the closed port included


@pytest.fixture
def inputs(tmp_path):
    shard = write_good_shards(tmp_path / "shards", n_shards=1, per_shard=1)[0]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red circle\nblue cross\n")
    return [shard, "--vocab", str(vocab), "--model", "gemlabel-toy"]


def _fresh_filesystems() -> None:
    """Drop cached fsspec filesystems: the next Store reads the environment again."""
    for protocol in ("s3", "gs"):
        fsspec.get_filesystem_class(protocol).clear_instance_cache()


CASES = {
    "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "gemlabel", "access denied"),
    "no credentials": (
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
        "gemlabel",
        "no credentials found",
    ),
    "missing bucket": ({}, "no-such-bucket", "the bucket does not exist"),
    "closed port": (
        {"AWS_ENDPOINT_URL": "closed", "AWS_ENDPOINT_URL_S3": "closed"},
        "gemlabel",
        "the endpoint does not answer",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_run_refuses_an_unusable_s3_output_in_one_line(
    s3_server, monkeypatch, capsys, inputs, case
):
    env, bucket, what = CASES[case]
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, closed if value == "closed" else value)
    _fresh_filesystems()
    url = f"s3://{bucket}/out-{uuid.uuid4().hex}"
    started = time.monotonic()
    code = main(["run", *inputs, "--out", url])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    monkeypatch.undo()
    _fresh_filesystems()
    assert code == 2 and seconds < BOUND_S, (seconds, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write to {url}: {what}" in err and 'README, "Object stores"' in err
    assert "AWS_ACCESS_KEY_ID" in err
    fs = s3_server.filesystem()
    assert not fs.exists(url), "nothing written"
    assert not fs.exists("no-such-bucket"), "no bucket created"


def test_readers_name_the_url_too(s3_server, monkeypatch, capsys):
    url = s3_server.url()
    Store(url).write_text("manifest.json", '{"status": "complete"}')
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    _fresh_filesystems()
    for args in (["status", url], ["view", url], ["report", url]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gemlabel: error: cannot read {url}: access denied"), err
        assert err.count("\n") == 1
    monkeypatch.undo()
    _fresh_filesystems()


@pytest.mark.parametrize("server", ["s3_server", "gcs_server"])
def test_probe_passes_and_leaves_nothing(request, server):
    store_server = request.getfixturevalue(server)
    url = store_server.url()
    check_writable(Store(url))
    assert Store(url).ls("_lock") == []  # the probe object is gone
    missing = f"{store_server.protocol}://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    with pytest.raises(StorageAccessError, match="the bucket does not exist"):
        check_writable(Store(missing))


def test_local_outputs_are_not_probed(tmp_path):
    check_writable(Store(str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
