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


@pytest.fixture
def vocab_file(tmp_path):
    """A small vocabulary file (one class name per line)."""
    path = tmp_path / "vocab.txt"
    path.write_text("cat\ndog\ncar\ntree\nsky\nperson\nbicycle\nboat\n")
    return str(path)
