"""One writer at a time per output: `OUT/_lock/<generation>.json`.

Two runs writing one output would label the same keys twice (each scans the output before
the other has written) and delete each other's files. So `gemlabel run` (and `filter`,
`shards` on their destination) holds a lock while it writes. A lock is a *claim*: a small
JSON file naming the run (host, pid, start time, a random id), numbered by generation.

- **Acquire**: read the newest claim. When there is none, or it was released, or its
  holder is dead, create the next generation with `Store.create` (exclusive: S3
  `If-None-Match: *`, GCS `ifGenerationMatch=0`, a hard link on local disks). Of runs
  racing for one generation exactly one wins; the others look again and find a live
  holder. A holder is dead when, on the same host, its process is gone (pid and start
  time, so a recycled pid does not count), or, from another host, its heartbeat is
  LOCK_STALE_S old; a run from another host waits until it sees the heartbeat move (alive:
  refused) or go stale (taken over), so a driver restarted elsewhere resumes by itself.
- **Heartbeat**: every HEARTBEAT_S the holder looks for a newer generation, then rewrites
  its own claim with a new heartbeat. Nobody else ever writes that name (a takeover creates
  the next one), so the update is conditional on still holding the lock, the equivalent of
  an ETag / generation match. When a newer claim exists, or the heartbeat could not be
  written for LOCK_STALE_S - HEARTBEAT_S (others may take over), the lock is *lost*:
  `check` raises LockLostError naming the holder, and the run stops writing at once.
- **Release**: the holder marks its claim released. Generations only grow (older claims are
  deleted by the next holder), so a stalled ex-holder that wakes up always finds a newer one.
"""

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid

from pipeline.storage.store import Store, as_store

logger = logging.getLogger(__name__)

LOCK_DIR = "_lock"
HEARTBEAT_S = 20.0
LOCK_STALE_S = 120.0  # a heartbeat older than this belongs to a dead run
POLL_S = 1.0  # how often a waiting run looks at the lock again


class OutputLockedError(ValueError):
    """Another live run is writing the output directory."""


class LockLostError(RuntimeError):
    """This run's lock was taken over, or could not be kept: it must stop writing."""


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


def _generation(path: str) -> int | None:
    stem = posixpath.basename(path).removesuffix(".json")
    return int(stem) if stem.isdigit() else None


def describe(claim: dict) -> str:
    """Who holds a claim, for messages."""
    age = time.time() - float(claim.get("heartbeat", 0))
    return f"host {claim.get('host')}, pid {claim.get('pid')}, heartbeat {age:.0f} s ago"


def newest_claim(store: Store | str) -> dict | None:
    """The newest claim on `store` (live, released or dead), or None: one LIST, one GET."""
    store = as_store(store)
    found = ((_generation(p), p) for p in store.ls(LOCK_DIR, ".json"))
    claims = sorted((g, p) for g, p in found if g is not None)
    if not claims:
        return None
    try:
        claim = json.loads(store.read(claims[-1][1]))
    except (FileNotFoundError, ValueError):  # replaced meanwhile, or not ours
        return None
    return claim if isinstance(claim, dict) else None


class OutputLock:
    """Claims a `Store` for one writer, as a context manager (see the module doc); raises
    OutputLockedError on entry when another live run holds it."""

    def __init__(self, store: Store | str):
        self.store = as_store(store)
        pid = os.getpid()
        self.owner = {
            "id": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": pid,
            "started": _started(pid),
        }
        self.generation = 0
        self.lost: str | None = None  # why the lock was lost
        self._beat = 0.0  # when the claim was last written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    @property
    def display(self) -> str:
        """Where the claims live, as the user would write it."""
        return self.store.display(LOCK_DIR)

    def _name(self, generation: int) -> str:
        return posixpath.join(LOCK_DIR, f"{generation:012d}.json")

    def _claims(self) -> list[tuple[int, str]]:
        """(generation, path) of every claim, oldest first, asked of the store now."""
        found = ((_generation(p), p) for p in self.store.ls(LOCK_DIR, ".json"))
        return sorted((g, p) for g, p in found if g is not None)

    def _read(self, path: str) -> dict | None:
        try:
            claim = json.loads(self.store.read(path))
        except (FileNotFoundError, ValueError):
            return None
        return claim if isinstance(claim, dict) else None

    def _data(self, **extra) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time(), **extra}).encode()

    def _dead(self, claim: dict) -> bool:
        if claim.get("released") or time.time() - float(claim.get("heartbeat", 0)) > LOCK_STALE_S:
            return True
        same_host = claim.get("host") == self.owner["host"]
        return same_host and not _alive(int(claim.get("pid", 0)), claim.get("started"))

    def _refuse(self, claim: dict) -> OutputLockedError:
        return OutputLockedError(
            f"{self.store.display()} is being written by another gemlabel run "
            f"({describe(claim)}). Wait for it to finish or stop it; a run that died is taken "
            f"over after {LOCK_STALE_S:.0f} s (or delete {self.display} once you are sure it "
            "is gone)."
        )

    def _acquire(self) -> None:
        seen = None  # the other host's heartbeat when first seen
        while True:
            claims = self._claims()
            top, path = claims[-1] if claims else (0, None)
            claim = self._read(path) if path else None
            if path and claim is None:  # replaced or removed meanwhile: look again
                time.sleep(POLL_S / 10)
                continue
            if claim is None or self._dead(claim):
                if self.store.create(self._name(top + 1), self._data()):
                    self.generation, self._beat = top + 1, time.time()
                    self.store.delete([p for g, p in claims if g <= top])
                    return
                continue  # another run claimed it first: look at its claim
            if claim.get("host") == self.owner["host"] or (
                seen is not None and claim.get("heartbeat") != seen
            ):
                raise self._refuse(claim)  # alive: its process exists, or its heartbeat moved
            if seen is None:
                seen = claim.get("heartbeat")
                logger.warning(
                    "%s is locked by a run on host %s; waiting up to %.0f s to see whether it "
                    "is alive",
                    self.store.display(),
                    claim.get("host"),
                    LOCK_STALE_S,
                )
            time.sleep(POLL_S)

    def __enter__(self) -> "OutputLock":
        self._acquire()
        self._thread.start()
        return self

    def _lose(self, why: str) -> None:
        self.lost = f"lost the lock on {self.store.display()}: {why}; this run stopped writing"
        logger.error(self.lost)

    def beat(self) -> None:
        """One heartbeat (the thread's step): lose the lock to a newer claim, else rewrite ours."""
        newer = [p for g, p in self._claims() if g > self.generation]
        if newer:
            holder = self._read(newer[-1]) or {}
            self._lose(f"another run took it over ({describe(holder)})")
            return
        self.store.write(self._name(self.generation), self._data())
        self._beat = time.time()

    def _heartbeat(self) -> None:
        while self.lost is None and not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except OSError as err:  # a missed beat is retried; LOCK_STALE_S spans several
                logger.warning("could not refresh %s: %s", self.display, err)
                if time.time() - self._beat > LOCK_STALE_S - HEARTBEAT_S:
                    self._lose(f"its heartbeat could not be written for {LOCK_STALE_S:.0f} s")

    def check(self) -> None:
        """Raise LockLostError when the lock was lost (see the module doc)."""
        if self.lost is not None:
            raise LockLostError(self.lost)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost is None:  # a newer claim, if any, still wins: it has a higher generation
            self.store.write(self._name(self.generation), self._data(released=True))
