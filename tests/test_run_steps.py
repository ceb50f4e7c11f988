"""The run's steps that need no Ray: the summary and its status and exit code, the tally
of the write stage's rows, the error budget, error kinds, and the watchdog (on a fake
clock, with a real output lock)."""

import numpy as np
import pytest

from pipeline.drive import StalledError, Watchdog
from pipeline.errors import error_kind, shorten
from pipeline.exit_codes import EXIT_ERROR_BUDGET, EXIT_FAILED, EXIT_OK
from pipeline.storage.lock import LockLostError, OutputLock
from pipeline.storage.store import Store
from pipeline.summary import ErrorBudget, RunSummary, Tally, count_written, settle


def summary_batch(statuses, masks, errors=None, file="f1.parquet", shard="s0"):
    n = len(statuses)
    return {
        "shard": np.array([shard] * n, dtype=object),
        "status": np.array(statuses, dtype=object),
        "error": np.array(errors or [None] * n, dtype=object),
        "masks": np.array(masks),
        "dropped_empty": np.array([1] * n),
        "file": np.array([file] * n, dtype=object),
        "node": np.array(["node-a"] * n, dtype=object),
    }


def test_tally_counts_rows_errors_nodes_and_written_files():
    summary = RunSummary(out="o", status="complete")
    tally = Tally(summary)
    errors = [None, "read: [Errno 2] No such file (a.tar)", "read: [Errno 2] No such file (b)"]
    tally.add(summary_batch(["ok", "error", "error"], [3, 0, 0], errors))
    tally.add(summary_batch(["ok"], [2], file="f2.parquet", shard="s1"))
    assert (summary.ok, summary.errors, summary.masks, summary.dropped_empty) == (2, 2, 5, 4)
    assert tally.top_errors() == [("read: [Errno 2] No such file", 2)]
    assert tally.nodes == {"node-a": 4}
    assert tally.written == {
        "images/f1.parquet": {("s0", "ok"): 1, ("s0", "error"): 2},
        "masks/f1.parquet": {("s0",): 3},
        "images/f2.parquet": {("s1", "ok"): 1},
        "masks/f2.parquet": {("s1",): 2},
    }


def test_count_written_adds_to_what_is_there():
    written = {}
    count_written(summary_batch(["ok"], [1]), written)
    count_written(summary_batch(["ok", "error"], [4, 0]), written)
    assert written["images/f1.parquet"] == {("s0", "ok"): 2, ("s0", "error"): 1}
    assert written["masks/f1.parquet"] == {("s0",): 5}


def test_error_budget_applies_after_min_samples():
    budget = ErrorBudget(max_rate=0.5, min_samples=4)
    assert not budget.exceeded(RunSummary("o", "complete", ok=0, errors=3))  # 3 < 4 samples
    assert not budget.exceeded(RunSummary("o", "complete", ok=2, errors=2))  # exactly half
    summary = RunSummary("o", "complete", ok=1, errors=3)
    assert budget.exceeded(summary)
    budget.abort(summary)
    assert summary.status == "aborted" and summary.exit_code == EXIT_ERROR_BUDGET
    assert "3 of 4 samples failed (75.0%), more than --max-error-rate 0.5" in summary.message


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("complete", EXIT_OK),
        ("aborted", EXIT_ERROR_BUDGET),
        ("failed", EXIT_FAILED),
        ("incomplete", EXIT_FAILED),
        ("stalled", EXIT_FAILED),
        ("lock lost", EXIT_FAILED),
    ],
)
def test_exit_codes(status, code):
    assert RunSummary("o", status).exit_code == code


def report(*shards):
    return {
        name: {"complete": complete, "images": images, "errors": errors}
        for name, complete, images, errors in shards
    }


def test_a_run_that_labeled_nothing_fails():
    summary = RunSummary("o", "complete", errors=2, top_errors=[("read: gone", 2)])
    settle(summary, report(("a", True, 1, 1), ("b", True, 1, 1)))
    assert summary.status == "failed" and summary.exit_code == EXIT_FAILED
    assert summary.message.startswith("nothing could be labeled: all 2 images of the inputs")
    text = summary.format()
    assert text.startswith("gemlabel run failed: 2 images (0 ok, 2 error)")
    assert "most common errors:\n       2 x read: gone" in text
    empty = RunSummary("o", "complete")
    settle(empty, report(("a", True, 0, 0)))
    assert empty.status == "failed" and "the inputs hold no image" in empty.message


def test_settle_incomplete_and_complete():
    summary = RunSummary("o", "complete", ok=1)
    settle(summary, report(("a", True, 1, 0), ("b", False, 0, 0)))
    assert summary.status == "incomplete" and "rerun to resume" in summary.message
    summary = RunSummary("o", "complete", skipped=3)  # all done before: still complete
    settle(summary, report(("a", True, 3, 1)))
    assert (summary.status, summary.message) == ("complete", "")
    summary = RunSummary("o", "stalled", message="no progress")
    settle(summary, report(("a", False, 0, 0)))
    assert (summary.status, summary.message) == ("stalled", "no progress")


def test_summary_format():
    summary = RunSummary("out", "complete", ok=9, errors=1, masks=20, dropped_empty=2, seconds=2)
    summary.skipped, summary.damaged_shards = 5, ["s.tar"]
    assert summary.format().splitlines() == [
        "gemlabel run complete: 10 images (9 ok, 1 error), 20 masks (2 empty, not written) in "
        "2.0 s (5.0 images/s); 5 already done",
        "output: out",
        "unreadable or damaged shards (1):",
        "  s.tar",
    ]


def test_error_kinds_are_cut_between_words():
    assert error_kind("decode: bad (key 7, 12 bytes)") == "decode: bad"
    long = "read: [Errno 2] No such file or directory: " + "/very/long/path/segment " * 10
    kind = error_kind(long)
    assert len(kind) <= 200 and kind.endswith("…")
    assert long.startswith(kind[:-1]) and not long[len(kind) - 1].isalnum()  # between words
    assert shorten("one two three", 9) == "one two…"
    assert shorten("abcdefghij", 5) == "abcd…"  # one word longer than the room
    assert shorten("short", 9) == "short"
    assert shorten("ab", 1) == "a…"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_ends_a_stream_without_progress(tmp_path):
    clock = FakeClock()
    with OutputLock(Store(str(tmp_path))) as lock:
        watchdog = Watchdog(lock, timeout=10, describe=lambda: "CPU 0 free of 2", clock=clock)
        clock.now += 10
        watchdog.check_stall()  # exactly the timeout: not yet
        watchdog.progressed(clock.now - 1)  # a stage ticked a second ago
        clock.now += 9
        watchdog.check_stall()
        clock.now += 2
        with pytest.raises(StalledError) as error:
            watchdog.check_stall()
        assert "no progress for 12 s" in str(error.value)
        assert "--stall-timeout 10" in str(error.value) and "CPU 0 free of 2" in str(error.value)
        watchdog.progressed(clock.now - 100)  # an older report moves nothing back
        with pytest.raises(StalledError):
            watchdog.check_stall()
        watchdog.progressed()
        watchdog.check_stall()


def test_watchdog_stops_a_run_whose_lock_was_taken_over(tmp_path):
    store = Store(str(tmp_path))
    with OutputLock(store) as lock:
        watchdog = Watchdog(lock, timeout=10, clock=FakeClock())
        watchdog.check_lock()
        newer = OutputLock(store)  # another run's claim, one generation up
        store.write(newer._name(lock.generation + 1), newer._data())
        lock.beat()
        with pytest.raises(LockLostError, match="another run took it over"):
            watchdog.check_lock()


def test_summary_says_when_the_weights_are_random():
    text = RunSummary("out", "complete", ok=1, random_weights=True).format()
    assert "weights: seeded random (--pretrained random): the masks mean nothing" in text
    assert "random" not in RunSummary("out", "complete", ok=1).format()
