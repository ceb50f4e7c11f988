"""One run at a time per output directory: `OUT/_lock.json`.

Two runs writing one output would label the same keys twice (each scans the output before
the other has written) and delete each other's temp files. So `gemlabel run` holds a lock
while it writes: a small JSON file naming the run (host, pid, a random id) with a heartbeat
that a thread refreshes every HEARTBEAT_S. Another run honours it while the holder is alive:

- on the same host, while its process exists (a killed run's lock is taken over at once; the
  process's start time guards against a recycled pid, e.g. in a restarted container);
- from another host, while its heartbeat moves: the newcomer waits until it sees a newer
  heartbeat (then the holder is alive: refused) or the heartbeat is LOCK_STALE_S old (the
  holder died: taken over). A driver restarted elsewhere after a crash thus resumes within
  LOCK_STALE_S, and a second live run is refused within about HEARTBEAT_S.

`gemlabel filter` and `gemlabel shards` take the same lock on their destination.

Works on any fsspec filesystem with atomic moves and read-after-write consistency (local
disks, shared mounts, S3, GCS).
"""

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid

from pipeline.storage.output import atomic_write, open_output

logger = logging.getLogger(__name__)

LOCK = "_lock.json"
HEARTBEAT_S = 20.0
LOCK_STALE_S = 120.0  # a heartbeat older than this belongs to a dead run
POLL_S = 1.0  # how often a waiting run looks at the lock again


class OutputLockedError(ValueError):
    """Another live run is writing the output directory."""


def _started(pid: int) -> str | None:
    """When process `pid` started, as boot id + start time in clock ticks (Linux), so that a
    recycled pid (another container, a reboot) is not taken for the run; None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name
    except OSError:
        return None
    return f"{boot}:{fields[19]}"  # field 22 of proc(5): starttime


def _alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` exists and, when `started` is known, is the one that started then."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return started is None or _started(pid) in (None, started)


class OutputLock:
    """Claims `out` for one run, as a context manager (see the module doc); raises
    OutputLockedError on entry when another live run holds it."""

    def __init__(self, out: str):
        self.out = out
        self.fs, root = open_output(out)
        self.path = posixpath.join(root, LOCK)
        pid = os.getpid()
        self.owner = {
            "id": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": pid,
            "started": _started(pid),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def _read(self) -> dict | None:
        try:
            lock = json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):  # none, or not one of ours (written whole)
            return None
        return lock if isinstance(lock, dict) and lock.get("id") else None

    def _write(self) -> None:
        data = json.dumps({**self.owner, "heartbeat": time.time()}).encode()
        atomic_write(self.fs, self.path, data)

    def _ours(self, lock: dict | None) -> bool:
        return lock is not None and lock["id"] == self.owner["id"]

    def _refuse(self, lock: dict) -> OutputLockedError:
        age = time.time() - float(lock.get("heartbeat", 0))
        return OutputLockedError(
            f"{self.out} is being written by another gemlabel run (host {lock.get('host')}, "
            f"pid {lock.get('pid')}, heartbeat {age:.0f} s ago). Wait for it to finish or "
            f"stop it; a run that died is taken over after {LOCK_STALE_S:.0f} s (or delete "
            f"{self.path} once you are sure it is gone)."
        )

    def _acquire(self) -> None:
        seen = None  # the other host's heartbeat when first seen
        while True:
            lock = self._read()
            free = (
                lock is None
                or time.time() - float(lock.get("heartbeat", 0)) > LOCK_STALE_S
                or (
                    lock.get("host") == self.owner["host"]
                    and not _alive(int(lock.get("pid", 0)), lock.get("started"))
                )
            )
            if free:
                self._write()
                lock = self._read()  # two runs starting together: the last write wins
                if self._ours(lock):
                    return
                if lock is None:  # removed meanwhile: look again
                    continue
            if lock.get("host") == self.owner["host"] or (
                seen is not None and lock.get("heartbeat") != seen
            ):
                raise self._refuse(lock)  # alive: its process exists, or its heartbeat moved
            if seen is None:
                seen = lock.get("heartbeat")
                logger.warning(
                    "%s is locked by a run on host %s; waiting up to %.0f s to see whether it "
                    "is alive",
                    self.out,
                    lock.get("host"),
                    LOCK_STALE_S,
                )
            time.sleep(POLL_S)

    def __enter__(self) -> "OutputLock":
        self._acquire()
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                lock = self._read()
                if lock is not None and not self._ours(lock):
                    logger.warning("%s: the lock was taken over by another run", self.out)
                    return
                self._write()
            except OSError as err:  # a missed beat is retried; LOCK_STALE_S spans several
                logger.warning("could not refresh %s: %s", self.path, err)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._ours(self._read()):
            self.fs.rm(self.path)
