"""What a lost node costs, piece by piece: the summary's line, the files of lost tasks
discarded after a complete stream (and nothing else), a shard whose read ran twice
journaled once, and a progress actor that does not answer (the driver goes on)."""

import logging
import time

import pyarrow as pa
import pytest

from pipeline.storage.output import discard_unreported
from pipeline.storage.store import Store
from pipeline.summary import RunSummary, Tally, redone


def test_the_summary_says_what_lost_nodes_cost():
    tally = Tally(RunSummary(out="o", status="complete"))
    assert redone(tally) == ""
    tally.lost_nodes, tally.reread_shards, tally.discarded = ["n1"], 2, ["images/x.parquet"]
    assert redone(tally) == (
        "1 node(s) lost during the run: n1; Ray re-ran their tasks and restarted their "
        "labeling actors; redone here: 2 shard(s) read again (journaled once), 1 output "
        "file(s) of lost tasks discarded (their rows were written again)"
    )


def test_only_new_unreported_files_are_discarded(tmp_path):
    """After a complete stream: this run's reported file stays, an earlier run's file stays,
    a file this run wrote whose summary never came back goes, with its masks twin."""
    store = Store(str(tmp_path))
    table = pa.table({"key": ["k"]})
    for name in ("images/old", "images/reported", "masks/reported", "images/lost", "masks/lost"):
        store.write_table(f"{name}.parquet", table)
    existing = frozenset(p for p in store.ls("images", ".parquet") if p.endswith("old.parquet"))
    tally = Tally(RunSummary(out="o", status="complete"))
    tally.written = {"images/reported.parquet": {}, "masks/reported.parquet": {}}
    listing = (store.ls("images", ".parquet"), store.ls("masks", ".parquet"))
    (images, masks), discarded = discard_unreported(store, listing, tally.written, existing)
    left = sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in images + masks)
    assert left == ["images/old.parquet", "images/reported.parquet", "masks/reported.parquet"]
    assert sorted(store.ls("images", ".parquet") + store.ls("masks", ".parquet")) == sorted(
        images + masks
    )
    assert discarded == ["images/lost.parquet"]
    again = discard_unreported(store, (images, masks), tally.written, existing)
    assert again == ((images, masks), [])


@pytest.mark.slow
def test_progress_journals_a_reread_shard_once_and_may_stop_answering(ray_local, tmp_path, caplog):
    import ray

    from pipeline.cluster import start_progress
    from pipeline.drive import ShardStats

    progress = start_progress()
    stats = {"shard": "s0", "samples": 8, "damaged": False, "damage": None, "split_keys": []}
    ray.get([progress.shard_end.remote(stats), progress.shard_end.remote(stats)])
    journal = ShardStats(Store(str(tmp_path)), progress)
    last = journal.poll()
    assert journal.pending == [stats] and ray.get(progress.rereads.remote()) == 1

    ray.kill(progress)  # as if its node were gone: the driver goes on with what it heard
    deadline = time.time() + 30
    while time.time() < deadline:  # a call right after the kill may still be answered
        try:
            ray.get(progress.rereads.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="pipeline.drive"):
        assert journal.poll() == last and journal.poll() == last
    warnings = [r.message for r in caplog.records if "does not answer" in r.message]
    assert len(warnings) == 1  # said once, not at every poll
