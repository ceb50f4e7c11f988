"""The storage layer on every backend: local paths, file://, memory://, S3 and GCS behave
the same; listings are fresh; writes are whole; nothing temporary is left behind."""

import pytest

from pipeline.storage.store import Store, split_file


@pytest.fixture(params=["local", "file", "memory", "s3", "gs"])
def store(request, tmp_path) -> Store:
    if request.param in ("s3", "gs"):
        server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
        return Store(server.url("store"))
    if request.param == "memory":
        return Store(f"memory://store-{tmp_path.name}")
    prefix = "file://" if request.param == "file" else ""
    return Store(f"{prefix}{tmp_path / 'out'}")


def test_write_read_list_delete(store):
    assert store.ls("images") == [] and store.read_text("manifest.json") is None
    store.write("images/a.parquet", b"a")
    store.write_text("manifest.json", "{}")
    assert store.read("images/a.parquet") == b"a" and store.exists("manifest.json")
    assert [p.rsplit("/", 1)[1] for p in store.ls("images", ".parquet")] == ["a.parquet"]
    store.write("images/a.parquet", b"again")  # an overwrite is whole too
    assert store.read("images/a.parquet") == b"again"
    store.delete(store.ls("images"))
    assert store.ls("images") == [] and not store.exists("images/a.parquet")
    assert store.ls("") == [store.path("manifest.json")]
    assert store.find_temp() == []  # no temp file or object left by any write


def test_a_listing_is_never_served_from_a_cache(store):
    """A listing taken, then a file written by another writer (another Store, as a Ray task
    would): the next listing sees it. The bug that deleted users' masks on S3/GCS."""
    store.write("masks/old.parquet", b"x")
    assert len(store.ls("masks")) == 1  # fills s3fs/gcsfs listing caches
    Store(store.display()).write("masks/new.parquet", b"y")
    assert [p.rsplit("/", 1)[1] for p in store.ls("masks")] == ["new.parquet", "old.parquet"]
    Store(store.display()).delete([store.path("masks/old.parquet")])
    assert [p.rsplit("/", 1)[1] for p in store.ls("masks")] == ["new.parquet"]
    assert not store.exists("masks/old.parquet")


def test_open_write_appears_only_when_complete(store):
    with pytest.raises(RuntimeError):
        with store.open_write("shard-000000.tar") as f:
            f.write(b"half")
            raise RuntimeError("the writer died")
    assert not store.exists("shard-000000.tar") and store.find_temp() == []
    with store.open_write("shard-000000.tar") as f:
        f.write(b"whole")
    assert store.read("shard-000000.tar") == b"whole"


def test_display_keeps_the_url_and_stores_pickle_as_their_url(store):
    import pickle

    again = pickle.loads(pickle.dumps(store))
    assert again == store and again.display("x") == store.display("x")
    if "://" in store.url and not store.url.startswith("file://"):
        assert store.display("images").startswith(store.url.split("://")[0] + "://")
    parent, name = split_file(store.display("report.html"))
    assert name == "report.html" and parent == store
