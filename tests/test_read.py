"""Reading shards: input expansion, key grouping, damaged and missing shards, HTTP, resume."""

import functools
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.dataset import ShardDatasource
from pipeline.stages.read import (
    TarKeys,
    expand_inputs,
    group_samples,
    read_shard,
    tar_members,
)
from pipeline.storage.schema import READ_SCHEMA
from pipeline.tools.labeled_shards import iter_samples
from tests.shards import image_bytes, payload_path, write_bad_corpus, write_good_shards


def rows(shard: str, **kwargs) -> list[dict]:
    tables = list(read_shard(shard, **kwargs))
    assert all(t.schema == READ_SCHEMA for t in tables)
    return pa.concat_tables(tables).to_pylist() if tables else []


def write_members(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar with exactly these members, in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_good_shards(tmp_path_factory.mktemp("good"), n_shards=3, per_shard=4)


def test_expand_inputs_paths_globs_braces_dirs_urls(good, tmp_path, monkeypatch):
    directory = str(Path(good[0]).parent)
    assert expand_inputs([f"{directory}/*.tar"]) == good
    assert expand_inputs([directory]) == good
    assert expand_inputs([f"{directory}/shard-{{000000..000002}}.tar"]) == good
    assert expand_inputs([f"file://{directory}/shard-00000[01].tar"]) == [
        f"file://{p}" for p in good[:2]
    ]
    # duplicates collapse, order is kept, relative paths become absolute
    monkeypatch.chdir(directory)
    assert expand_inputs([good[2], "shard-000002.tar", good[0]]) == [good[2], good[0]]
    # a missing plain path is kept (the reader reports it); an empty glob is an error
    assert expand_inputs([str(tmp_path / "missing.tar")]) == [str(tmp_path / "missing.tar")]
    with pytest.raises(ValueError, match="no shards"):
        expand_inputs([str(tmp_path / "*.tar")])


def test_rows_group_members_by_key(tmp_path):
    png = image_bytes(8, 6, "png")
    shard = write_members(
        tmp_path / "s.tar",
        [
            ("__meta__/info.json", b"{}"),  # webdataset meta entries are skipped
            ("a/000.seg.png", png),  # the key keeps directories; the extension is "seg.png"
            ("a/000.JPG", image_bytes(8, 6)),
            ("a/000.json", b"{}"),
            ("a/001.txt", b"caption"),
            ("a/001.png", png),
        ],
    )
    got = rows(shard)
    assert [(r["key"], r["image_ext"], r["error"]) for r in got] == [
        ("a/000", "jpg", None),
        ("a/001", "png", None),
    ]
    assert got[0]["shard"] == shard and got[1]["image"] == png


def test_members_split_into_key_and_extension_as_webdataset_does(tmp_path):
    """tar_members' split (read.py imports no webdataset: its package loads torch) is
    webdataset's: names without an extension are skipped, the key keeps directories."""
    from webdataset.tariterators import base_plus_ext

    names = ["a/b.c.JPG", "x.jpg", "d.v1/k.seg.png", "noext", "d.v1/noext", ".hidden", "a/.b.jpg"]
    shard = write_members(tmp_path / "s.tar", [(name, b"") for name in names])
    with open(shard, "rb") as stream:
        got = [(key, ext) for key, ext, _ in tar_members(stream)]
    splits = [base_plus_ext(name) for name in names]
    assert got == [split for split in splits if split[0] is not None]
    assert ("d.v1/k", "seg.png") in got and len(got) == 4


def test_non_contiguous_key_is_listed_not_doubled(tmp_path):
    shard = write_members(
        tmp_path / "s.tar",
        [("k1.jpg", image_bytes(4, 4)), ("k2.jpg", image_bytes(4, 4)), ("k1.txt", b"late")],
    )
    ended = []
    assert [r["key"] for r in rows(shard, on_end=ended.append)] == ["k1", "k2"]
    [stats] = ended
    assert stats["split_keys"] == ["k1"] and stats["samples"] == 2


def test_one_grouping_for_the_run_and_the_tools(tmp_path):
    """group_samples is the run's grouping (read_shard) and the tools' (iter_samples): same
    samples, same order, a reappearing key's later members ignored, skipped keys unread."""
    jpg = image_bytes(4, 4)
    shard = write_members(
        tmp_path / "s.tar",
        [("k1.jpg", jpg), ("k1.txt", b"a"), ("k2.jpg", jpg), ("k1.cls", b"late"), ("k3.jpg", jpg)],
    )
    samples = list(iter_samples(shard))
    assert samples == [
        ("k1", [("jpg", jpg), ("txt", b"a")]),
        ("k2", [("jpg", jpg)]),
        ("k3", [("jpg", jpg)]),
    ]
    assert [r["key"] for r in rows(shard)] == [key for key, _ in samples]
    keys = TarKeys()
    with open(shard, "rb") as stream:
        skipped = list(group_samples(tar_members(stream), frozenset({"k2"}), keys))
    assert [key for key, _ in skipped] == ["k1", "k3"]
    assert list(keys.seen) == ["k1", "k2", "k3"] and keys.split == ["k1"]


def test_the_sample_being_read_when_a_tar_breaks_off_is_known(tmp_path):
    jpg = image_bytes(16, 16)
    shard = write_members(tmp_path / "s.tar", [("k1.jpg", jpg), ("k2.jpg", jpg), ("k2.txt", b"t")])
    data = Path(shard).read_bytes()
    padded = -(-len(jpg) // 512) * 512
    Path(shard).write_bytes(data[: 512 + padded + 512 + 10])  # inside k2.jpg
    keys = TarKeys()
    with open(shard, "rb") as stream, pytest.raises(tarfile.ReadError):
        for _ in group_samples(tar_members(stream), keys=keys):
            pass
    assert keys.current == "k2" and list(keys.seen) == ["k1", "k2"]
    got = rows(shard)
    assert [r["key"] for r in got] == ["k1", "k2"] and "truncated or corrupt" in got[1]["error"]


def test_duplicate_member_is_an_error_row(tmp_path):
    jpg = image_bytes(4, 4)
    shard = write_members(tmp_path / "s.tar", [("k.jpg", jpg), ("k.jpg", jpg)])
    [row] = rows(shard)
    assert row["error"].startswith("read: sample has two members named 'jpg'")


def test_bad_corpus_truncated_missing_and_pickles(tmp_path):
    (main, cut, missing), expected = write_bad_corpus(tmp_path)
    ended = []
    got = {
        (r["shard"], r["key"]): r
        for s in (main, cut, missing)
        for r in rows(s, on_end=ended.append)
    }
    # read-stage expectations: errors for samples without images, the truncated sample
    for (shard, key), expect in expected.items():
        row = got[(shard, key if key is not None else "")]
        if expect.stage == "read":
            assert row["error"].startswith("read: ") and row["image"] is None
            assert expect.message in row["error"]
        else:
            assert row["error"] is None and row["image"] is not None
    assert len(got) == len(expected)
    assert "truncated or corrupt" in got[(cut, "cut2")]["error"]
    assert got[(missing, "")]["error"].startswith(f"read: cannot open shard {missing}")
    assert "pickle" not in {r["image_ext"] for r in got.values()}
    assert not payload_path(tmp_path).exists()
    stats = {s["shard"]: s for s in ended}
    assert stats[main]["damaged"] is False and stats[main]["samples"] == 17
    assert stats[cut]["damaged"] is True and stats[cut]["samples"] == 3
    assert stats[missing]["damaged"] is True and stats[missing]["samples"] == 1


def test_not_a_tar(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x00garbage" * 100)
    [row] = rows(str(path))
    assert row["key"] == "" and row["error"].startswith("read: not a readable tar")


def test_done_keys_are_skipped_and_blocks_are_bounded(good, tmp_path):
    ended = []
    tables = list(read_shard(good[0], frozenset({"000001"}), 2, on_end=ended.append))
    assert [t.num_rows for t in tables] == [2, 1]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert keys == ["000000", "000002", "000003"]
    [stats] = ended
    assert stats["samples"] == 4  # skipped keys still count: the shard has 4 rows in total


@pytest.fixture(scope="module")
def http_server(good):
    handler = functools.partial(Quiet, directory=str(Path(good[0]).parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shards_brace_glob_and_404(http_server, good):
    urls = expand_inputs([f"{http_server}/shard-{{000000..000001}}.tar"])
    assert urls == [f"{http_server}/shard-00000{i}.tar" for i in range(2)]
    assert expand_inputs([f"{http_server}/*.tar"]) == [
        f"{http_server}/{Path(p).name}" for p in good
    ]
    local = rows(good[1])
    remote = rows(urls[1])
    assert [(r["key"], r["image"]) for r in remote] == [(r["key"], r["image"]) for r in local]
    [row] = rows(f"{http_server}/nope.tar")
    assert row["key"] == "" and row["error"].startswith("read: cannot open shard")


@pytest.mark.slow
def test_datasource_one_task_per_shard(ray_local, good, tmp_path):
    missing = str(tmp_path / "missing.tar")
    source = ShardDatasource(good + [missing], done={good[0]: {"000000"}})
    assert len(source.get_read_tasks(1)) == 4
    got = ray_local.data.read_datasource(source, override_num_blocks=4).take_all()
    keys = sorted((r["shard"], r["key"]) for r in got)
    assert len(keys) == 12 - 1 + 1 and len(set(keys)) == len(keys)
    assert (good[0], "000000") not in keys and (missing, "") in keys
