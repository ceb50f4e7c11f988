"""The object-store test infrastructure: SeaweedFS S3, fake-gcs-server and the counting proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest

from tests.object_stores import classify

pytestmark = pytest.mark.timeout(300)


def _exists_errors(protocol: str) -> tuple[type[BaseException], ...]:
    """What a failed exclusive create raises: gcsfs FileExistsError; s3fs on SeaweedFS an
    OSError(EINVAL, "At least one of the pre-conditions ...") (no Condition in the 412 body)."""
    return (FileExistsError,) if protocol == "gs" else (FileExistsError, OSError)


@pytest.fixture(params=["s3_server", "gcs_server"])
def store(request: pytest.FixtureRequest):
    """Each real object store in turn."""
    return request.getfixturevalue(request.param)


def test_basic_operations(store) -> None:
    fs = store.filesystem()
    base = store.url("basic").split("://", 1)[1]
    fs.pipe_file(f"{base}/a.bin", b"hello")
    fs.pipe_file(f"{base}/sub/b.bin", b"world")
    assert fs.cat_file(f"{base}/a.bin") == b"hello"
    assert fs.exists(f"{base}/a.bin") and not fs.exists(f"{base}/nope.bin")
    assert fs.info(f"{base}/a.bin")["size"] == 5
    assert sorted(fs.ls(base, detail=False, refresh=True)) == [f"{base}/a.bin", f"{base}/sub"]
    assert fs.find(base) == [f"{base}/a.bin", f"{base}/sub/b.bin"]
    fs.rm(f"{base}/a.bin")
    assert not fs.exists(f"{base}/a.bin")
    fresh = store.filesystem()  # a new instance sees the removal at once
    assert fresh.ls(base, detail=False) == [f"{base}/sub"]
    fs.rm(base, recursive=True)
    assert not store.filesystem().exists(f"{base}/sub/b.bin")


def test_exclusive_create(store) -> None:
    fs = store.filesystem()
    path = store.url("excl").split("://", 1)[1] + "/x"
    fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(_exists_errors(store.protocol)) as info:
        fs.pipe_file(path, b"second", mode="create")
    if store.protocol == "s3":
        assert "pre-conditions" in str(info.value)
    with pytest.raises(_exists_errors(store.protocol)), fs.open(path, "xb") as f:
        f.write(b"third")
    assert store.filesystem().cat_file(path) == b"first"


def test_exclusive_create_resumable_gcs(gcs_server) -> None:
    """A resumable (multi-chunk) upload: fake-gcs-server ignores ifGenerationMatch here, the
    proxy enforces it on the upload's PUTs."""
    fs = gcs_server.filesystem()
    path = gcs_server.url("resumable").split("://", 1)[1]
    data = os.urandom(6 * 2**20)
    with fs.open(path, "xb", block_size=5 * 2**20) as f:
        f.write(data)
    gcs_server.requests.reset()
    with pytest.raises(FileExistsError), fs.open(path, "xb", block_size=5 * 2**20) as f:
        f.write(data[::-1])
    assert gcs_server.filesystem().cat_file(path) == data
    assert any(r.status == 412 for r in gcs_server.requests.requests)


def test_exclusive_create_race(store) -> None:
    """20 threads, each with its own filesystem instance, race to create one object."""
    path = store.url("race").split("://", 1)[1] + "/lock"
    barrier = threading.Barrier(20)
    store.requests.reset()

    def attempt(i: int) -> bool:
        fs = fsspec.filesystem(store.protocol, skip_instance_cache=True)
        barrier.wait()
        try:
            fs.pipe_file(path, str(i).encode(), mode="create")
            return True
        except _exists_errors(store.protocol):
            return False

    with ThreadPoolExecutor(20) as pool:
        wins = list(pool.map(attempt, range(20)))
    assert sum(wins) == 1
    assert store.filesystem().cat_file(path) == str(wins.index(True)).encode()
    puts = [r for r in store.requests.requests if r.kind == "PUT"]
    assert len(puts) == 20
    assert sorted(r.status for r in puts) == [200] + [412] * 19
    if store.protocol == "gs":  # request level: every upload asked for ifGenerationMatch=0
        assert all(r.query.get("ifGenerationMatch") == "0" for r in puts)


def test_proxy_counts(store) -> None:
    fs = store.filesystem()
    base = store.url("count").split("://", 1)[1]
    store.requests.reset()
    fs.pipe_file(f"{base}/a", b"1")
    fs.cat_file(f"{base}/a")
    fs.info(f"{base}/a")
    fs.ls(base, refresh=True)
    fs.rm_file(f"{base}/a")
    store.requests.settle()
    counts = store.requests.counts
    assert counts["PUT"] == 1 and counts["GET"] == 1 and counts["DELETE"] == 1
    assert counts["LIST"] >= 1 and counts["HEAD"] >= 1
    if store.protocol == "s3":
        fs.pipe_file(f"{base}/b", b"2")
        store.requests.reset()
        fs.copy(f"{base}/b", f"{base}/c")
        store.requests.settle()
        assert store.requests.counts["COPY"] == 1
    store.requests.reset()
    assert store.requests.total() == 0


def test_child_process_uses_inherited_env(s3_server, gcs_server) -> None:
    """A subprocess reaches both stores with nothing but the inherited environment."""
    s3_path = s3_server.url("child").split("://", 1)[1]
    gs_path = gcs_server.url("child").split("://", 1)[1]
    code = (
        "import sys, fsspec\n"
        "s3 = fsspec.filesystem('s3'); gs = fsspec.filesystem('gs')\n"
        "s3.pipe_file(sys.argv[1], b's3'); gs.pipe_file(sys.argv[2], b'gs')\n"
        "print(s3.cat_file(sys.argv[1]).decode(), gs.cat_file(sys.argv[2]).decode())\n"
    )
    s3_server.requests.reset()
    gcs_server.requests.reset()
    out = subprocess.run(
        [sys.executable, "-c", code, s3_path, gs_path],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["s3", "gs"]
    assert s3_server.requests.counts["PUT"] == 1  # counted across processes
    assert gcs_server.requests.counts["PUT"] == 1
    assert s3_server.filesystem().cat_file(s3_path) == b"s3"


def test_object_store_url(object_store_url: str) -> None:
    fs, path = fsspec.url_to_fs(object_store_url)
    fs.mkdirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/part-0.txt", b"x")
    assert fs.cat_file(f"{path}/part-0.txt") == b"x"
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)] == ["part-0.txt"]


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "kind"),
    [
        ("GET", "/bkt/key", {}, {}, "GET"),
        ("GET", "/bkt", {"list-type": "2"}, {}, "LIST"),
        ("PUT", "/bkt/key", {}, {"x-amz-copy-source": "/bkt/other"}, "COPY"),
        ("POST", "/bkt/key", {"uploads": ""}, {}, "POST"),
        ("GET", "/storage/v1/b/bkt/o", {"prefix": "a/"}, {}, "LIST"),
        ("GET", "/storage/v1/b/bkt/o/a%2Fb", {"alt": "media"}, {}, "GET"),
        ("GET", "/storage/v1/b/bkt/o/a%2Fb", {}, {}, "HEAD"),
        ("POST", "/upload/storage/v1/b/bkt/o", {"uploadType": "multipart"}, {}, "PUT"),
        ("PUT", "/upload/storage/v1/b/bkt/o", {"upload_id": "1"}, {}, "PUT_CHUNK"),
        ("DELETE", "/storage/v1/b/bkt/o/a", {}, {}, "DELETE"),
        ("POST", "/storage/v1/b/bkt/o/a/rewriteTo/b/bkt/o/c", {}, {}, "COPY"),
    ],
)
def test_classify(method: str, path: str, query: dict, headers: dict, kind: str) -> None:
    assert classify(method, path, query, headers) == kind


def test_ray_workers_inherit_env(s3_server, gcs_server, ray_local) -> None:
    """Ray workers started after the stores reach both of them (the raylet copies os.environ
    at ray.init: a Ray started before these fixtures would not see the stores)."""
    ray = ray_local

    @ray.remote
    def write(s3_path: str, gs_path: str) -> str:
        import os

        import fsspec

        fsspec.filesystem("s3").pipe_file(s3_path, b"ray")
        fsspec.filesystem("gs").pipe_file(gs_path, b"ray")
        return os.environ["AWS_ENDPOINT_URL"]

    @ray.remote
    def endpoint() -> str | None:
        import os

        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3_server.endpoint:
        pytest.skip("Ray was started before the object-store fixtures")
    s3_path = s3_server.url("ray").split("://", 1)[1]
    gs_path = gcs_server.url("ray").split("://", 1)[1]
    s3_server.requests.reset()
    assert ray.get(write.remote(s3_path, gs_path)) == s3_server.endpoint
    assert s3_server.requests.counts["PUT"] == 1
    assert s3_server.filesystem().cat_file(s3_path) == b"ray"
    assert gcs_server.filesystem().cat_file(gs_path) == b"ray"
