"""Driving the stream: the driver iterates the write stage's summary batches while it
watches the output lock and the stages' progress, and journals the shards' stats.

- `Watchdog`: ends a stream whose lock was lost (LockLostError) or that made no progress
  for `--stall-timeout` seconds (StalledError), on the clock it is given.
- `ShardStats`: the stats of the shards read to their end, as the readers report them to
  the Progress actor (pipeline.cluster), journaled into the output every JOURNAL_S.
- `stream`: the batches, from a thread that drives the dataset, checked every POLL_S.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import ray

from pipeline.storage import output
from pipeline.storage.lock import OutputLock
from pipeline.storage.store import Store

logger = logging.getLogger(__name__)
POLL_S = 1.0  # how often the driver looks at the lock and the progress while it waits
JOURNAL_S = 60.0  # how often the driver journals the shard stats the readers reported


class StalledError(RuntimeError):
    """The stream made no progress for the stall timeout."""


class Watchdog:
    """Checks a stream: its `lock` is still held, and it progressed within `timeout`
    seconds of `clock` (`describe()` tells the cluster's state in the stall message)."""

    def __init__(
        self,
        lock: OutputLock,
        timeout: float,
        describe: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.time,
    ):
        self.lock, self.timeout, self.describe, self.clock = lock, timeout, describe, clock
        self.last = clock()

    def progressed(self, at: float | None = None) -> None:
        """Progress was made `at` (a time of `clock`; None: now)."""
        self.last = max(self.last, self.clock() if at is None else at)

    def check_lock(self) -> None:
        """Raise LockLostError when the lock was lost."""
        self.lock.check()

    def check_stall(self) -> None:
        """Raise StalledError when the last progress is more than `timeout` seconds ago."""
        idle = self.clock() - self.last
        if idle > self.timeout:
            raise StalledError(
                f"no progress for {idle:.0f} s (nothing read, labeled or written; "
                f"--stall-timeout {self.timeout:g}). Ray: {self.describe()}. Tasks waiting "
                "for resources that never free, or a source that does not answer, stall a "
                "run: check `ray status` and the inputs; the rows written so far are valid "
                "and a rerun resumes."
            )


class ShardStats:
    """The stats of the shards read to their end, collected from the `progress` actor and
    journaled into the output every JOURNAL_S (one file each time, however many shards: a
    crash loses at most that much, and those shards are read again on resume, their done
    keys skipped). `watch` (pipeline.cluster.NodeWatch) notes the nodes alive at each poll."""

    def __init__(self, store: Store, progress, watch=None):
        self.store, self.progress, self.watch = store, progress, watch
        self.pending: list[dict] = []
        self.files: dict[str, str] = {}  # journal files written: name -> text
        self.written = time.time()
        self.samples: dict[str, int] = {}  # shard read to its end -> its samples
        self.last = time.time()  # the stages' last progress, as last heard
        self.unavailable = False

    def poll(self) -> float:
        """Collect what the readers reported; journal it when due. Returns the time of
        the stages' last progress (as last heard while the actor is unavailable: the
        watchdog keeps counting)."""
        if self.watch is not None:
            self.watch.poll()
        try:
            self.last, new = ray.get(self.progress.poll.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            if not self.unavailable:
                logger.warning("gemlabel: the progress actor does not answer: %s", err)
            self.unavailable = True
            return self.last
        self.unavailable = False
        self.pending += new
        self.samples.update((stats["shard"], stats["samples"]) for stats in new)
        if self.pending and time.time() - self.written > JOURNAL_S:
            self.flush()
        return self.last

    def flush(self) -> None:
        """Journal the stats not written yet."""
        if self.pending:
            name, text = output.write_shard_stats(self.store, self.pending)
            self.files[name] = text
            self.pending = []
        self.written = time.time()


def stream(ds, watchdog: Watchdog, stats: ShardStats) -> Iterator[dict]:
    """The write stage's summary batches of `ds`, from a thread that drives the stream,
    while this thread checks the lock and the progress (collecting the shard stats) every
    POLL_S. Raises LockLostError or StalledError."""
    batches: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def drive() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                batches.put(batch)
            batches.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
            batches.put(err)

    threading.Thread(target=drive, daemon=True, name="gemlabel-stream").start()
    watchdog.progressed()
    while True:
        watchdog.check_lock()
        try:
            item = batches.get(timeout=POLL_S)
        except queue.Empty:  # nothing came: look at the stages' progress
            watchdog.progressed(stats.poll())
            watchdog.check_stall()
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        watchdog.progressed()
        yield item
