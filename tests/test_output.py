"""The output directory: resume scan, orphan and temp cleanup, shard completion, manifest."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.stages.write import write_batch
from pipeline.storage import output
from pipeline.storage.store import Store
from tests.test_write import NAMES, labeled_batch


def test_scan_done_keys_orphans_and_temp_files(tmp_path):
    out = str(tmp_path)
    batch = labeled_batch()
    write_batch(batch, out, NAMES, 0.5, "threshold")
    orphan = tmp_path / "masks" / "0123.parquet"  # its images twin was never committed
    orphan.write_bytes((next((tmp_path / "masks").iterdir())).read_bytes())
    stale = tmp_path / "images" / ".abc.parquet.99.tmp"
    stale.write_bytes(b"partial")

    state = output.scan(out)  # an orphan is not counted, and a scan deletes nothing
    assert orphan.exists() and stale.exists()
    assert state.done == {"s0.tar": {"000", "002"}, "s1.tar": {"001", "003"}}
    assert state.rows == {"s0.tar": 2, "s1.tar": 2}
    assert state.errors == {"s0.tar": 0, "s1.tar": 1}
    assert state.masks == {"s0.tar": 4, "s1.tar": 2}
    images, masks = output.remove_leftovers(Store(out))
    assert not orphan.exists() and not stale.exists()
    assert (images, masks) == output.table_files(Store(out))
    assert output.scan(out).masks == state.masks


def test_shard_complete_needs_stats_and_all_rows(tmp_path):
    out = str(tmp_path)
    write_batch(labeled_batch(), out, NAMES, 0.5, "threshold")
    assert not output.scan(out).complete("s0.tar")  # no stats: the reader never finished it
    output.write_shard_stats(out, [{"shard": "s0.tar", "samples": 3, "damaged": False}])
    output.write_shard_stats(out, [{"shard": "s1.tar", "samples": 2, "damaged": False}])
    state = output.scan(out)
    assert not state.complete("s0.tar") and state.complete("s1.tar")
    report = output.shard_report(state, ["s0.tar", "s1.tar", "s2.tar"])
    assert report["s1.tar"]["complete"] and report["s0.tar"]["images"] == 2
    assert report["s2.tar"] == {
        "complete": False,
        "samples": None,
        "images": 0,
        "errors": 0,
        "masks": 0,
        "damaged": False,
        "damage": None,
    }
    assert output.totals(state) == {"images": 4, "ok": 3, "errors": 1, "masks": 6}


def test_scan_counts_every_file_and_keeps_keys_only_of_incomplete_shards(tmp_path):
    """Counts come from every committed file; keys are kept for a resume only where a shard
    is not complete (a complete shard is never read again)."""
    out = str(tmp_path)
    for seed in range(3):  # three batches: keys 000-003, 004-007, 008-011 of s0/s1
        batch = labeled_batch(seed=seed)
        batch["key"] = np.array([f"{4 * seed + i:03d}" for i in range(4)], dtype=object)
        write_batch(batch, out, NAMES, 0.5, "threshold")
    output.write_shard_stats(out, [{"shard": "s0.tar", "samples": 6, "damaged": False}])
    output.write_shard_stats(out, [{"shard": "s1.tar", "samples": 7, "damaged": False}])
    state = output.scan(out)
    assert state.rows == {"s0.tar": 6, "s1.tar": 6}
    assert state.errors == {"s0.tar": 0, "s1.tar": 3}  # each batch's last row is an error
    assert state.masks == {"s0.tar": 12, "s1.tar": 6}
    assert state.complete("s0.tar") and not state.complete("s1.tar")
    assert state.done == {"s1.tar": {"001", "003", "005", "007", "009", "011"}}
    assert output.totals(state) == {"images": 12, "ok": 9, "errors": 3, "masks": 18}
    report = output.shard_report(state, ["s0.tar", "s1.tar"])
    assert [report[s]["images"] for s in ("s0.tar", "s1.tar")] == [6, 6]


def test_scan_reads_only_files_it_has_not_counted(tmp_path):
    """The cache of per-file counts: a committed file is read once; files written later are
    counted, and only files holding incomplete shards are read for keys; a damaged cache is
    ignored; --overwrite deletes it."""
    out = str(tmp_path)
    write_batch(labeled_batch(seed=0), out, NAMES, 0.5, "threshold")
    output.write_shard_stats(out, [{"shard": "s0.tar", "samples": 2, "damaged": False}])
    output.write_shard_stats(out, [{"shard": "s1.tar", "samples": 2, "damaged": False}])
    first = output.scan(out, save=True)
    assert (tmp_path / output.SCAN_CACHE).exists() and first.complete("s1.tar")
    # damage the committed files: a scan that read them again would fail
    for table in ("images", "masks"):
        for path in (tmp_path / table).iterdir():
            path.write_bytes(b"not parquet")
    cached = output.scan(out)
    assert (cached.rows, cached.errors, cached.masks) == (first.rows, first.errors, first.masks)

    batch = labeled_batch(seed=1)  # written after the cache, shards without stats
    batch["shard"] = np.array(["s2.tar", "s3.tar"] * 2, dtype=object)
    write_batch(batch, out, NAMES, 0.5, "threshold")
    grown = output.scan(out, save=True)
    assert grown.rows == {"s0.tar": 2, "s1.tar": 2, "s2.tar": 2, "s3.tar": 2}
    assert grown.masks == {"s0.tar": 4, "s1.tar": 2, "s2.tar": 4, "s3.tar": 2}
    assert grown.done == {"s2.tar": {"000", "002"}, "s3.tar": {"001", "003"}}
    (tmp_path / output.SCAN_CACHE).write_bytes(b"damaged")
    with pytest.raises(pa.ArrowException):  # no cache: the damaged files are read again
        output.scan(out)

    output.prepare(out, {"a": 1}, overwrite=True)
    assert not (tmp_path / output.SCAN_CACHE).exists()


def test_scan_reads_stats_files_of_complete_shards_once(tmp_path):
    """Journals whose shards were all complete at a scan are kept in the cache and not read
    again (on object stores a request each); others are read every time, and new ones are
    read; where two journals name a shard, the later counts; a journal that is gone no
    longer counts."""
    out = str(tmp_path)
    write_batch(labeled_batch(seed=0), out, NAMES, 0.5, "threshold")
    s0, _ = output.write_shard_stats(out, [{"shard": "s0.tar", "samples": 2, "damaged": False}])
    output.write_shard_stats(out, [{"shard": "s1.tar", "samples": 3, "damaged": False}])
    first = output.scan(out, save=True)
    assert first.complete("s0.tar") and not first.complete("s1.tar")
    (tmp_path / s0).write_text("not json")  # a scan that read it again would fail
    s1, _ = output.write_shard_stats(out, [{"shard": "s1.tar", "samples": 2, "damaged": False}])
    output.write_shard_stats(out, [{"shard": "s2.tar", "samples": 0, "damaged": True}])
    second = output.scan(out, save=True)
    assert second.shards["s0.tar"]["samples"] == 2 and second.complete("s0.tar")
    assert second.complete("s1.tar") and second.shards["s2.tar"]["damaged"]
    (tmp_path / s1).write_text("not json")  # complete at the last scan: not read again
    (tmp_path / s0).unlink()
    third = output.scan(out, save=True)
    assert set(third.shards) == {"s1.tar", "s2.tar"} and third.complete("s1.tar")
    assert third.shards["s1.tar"]["samples"] == 2  # the later journal
    with pytest.raises(json.JSONDecodeError):  # without the cache every file is read
        (tmp_path / output.SCAN_CACHE).unlink()
        output.scan(out)


def test_an_older_output_with_a_stats_file_per_shard_resumes(tmp_path):
    """Outputs of earlier versions hold one stats object per shard in `_shards/`: still read."""
    out = str(tmp_path)
    write_batch(labeled_batch(seed=0), out, NAMES, 0.5, "threshold")
    (tmp_path / output.SHARDS_DIR).mkdir()
    (tmp_path / output.SHARDS_DIR / "0123abcd.json").write_text(
        json.dumps({"shard": "s0.tar", "samples": 2, "damaged": False})
    )
    state = output.scan(out)
    assert state.complete("s0.tar") and not state.complete("s1.tar")


def test_prepare_refuses_other_config_unless_overwrite(tmp_path):
    out = str(tmp_path / "out")
    config = {"model": "gemlabel-tiny", "top_k": 5}
    output.prepare(out, config)
    output.write_manifest(out, {"config": config, "status": "complete"})
    write_batch(labeled_batch(), out, NAMES, 0.5, "threshold")
    output.prepare(out, config)  # same configuration: resume
    assert output.read_manifest(out)["status"] == "complete"
    with pytest.raises(output.ConfigMismatchError, match=r"(?s)top_k: 5 -> 3.*--overwrite"):
        output.prepare(out, {"model": "gemlabel-tiny", "top_k": 3})
    output.prepare(out, {"model": "gemlabel-tiny", "top_k": 3}, overwrite=True)
    assert output.read_manifest(out) is None and output.scan(out).done == {}


def test_manifest_is_written_atomically(tmp_path):
    out = f"file://{tmp_path}"
    output.write_manifest(out, {"status": "incomplete", "b": [1, 2]})
    output.write_manifest(out, {"status": "complete", "b": [1, 2]})
    assert output.read_manifest(out) == {"status": "complete", "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == [output.MANIFEST]
