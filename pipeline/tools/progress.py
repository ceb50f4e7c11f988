"""How far a run is, read from its output alone (any Store: local, S3, GCS, ...).

A running driver keeps `OUT/_gemlabel/progress.json` (`ProgressLog`): written when the
stream starts, then at most once a minute as rows come back, and when it ends, it holds
the shards in the run and those done, the images expected in all, this run's images ok /
error and masks, the rows already there when it started, and the image count at each of
the last writes (the rate over them, and the ETA: the images still expected at that rate).
`output_progress` combines it with the manifest (the final counts once the run ended)
and the newest lock claim (who writes, and its heartbeat, refreshed every 20 s): four
reads (the manifest, the progress, the listing of `_lock/`, the newest claim; 6 requests
on S3, where s3fs sends a HEAD before a GET), however many files the output holds:
`images/` and `masks/` are never listed.

Status:
- `running`: a live claim (not released, heartbeat under LOCK_STALE_S old) whose run
  wrote rows within STALLED_S;
- `stalled`: a live claim, but no new rows for STALLED_S (or the run ended "stalled");
- `complete`: the manifest says so and no run holds the output;
- `failed`: the run ended failed, aborted by the error budget or with its lock lost;
- `incomplete`: no run holds the output and it is not complete (a run was stopped or
  died): rerunning the same command resumes.
"""

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass

from pipeline.storage import output
from pipeline.storage.credentials import explained
from pipeline.storage.lock import LOCK_STALE_S, newest_claim
from pipeline.storage.store import Store, as_store

PROGRESS = f"{output.STATE_DIR}/progress.json"
INTERVAL_S = 60.0  # how often a running driver rewrites progress.json (at most)
HISTORY = 11  # writes kept in progress.json: ten minutes of rates at one a minute
STALLED_S = 600.0  # a live run without new rows for this long is shown as stalled
FAILED = ("failed", "aborted", "lock lost")


class ProgressLog:
    """The driver's side: the run's counts in `OUT/_gemlabel/progress.json` (one PUT a
    write; `update` as rows come back writes at most every INTERVAL_S).

    A shard is done when its rows (before this run, `already`, and written by it) reach
    the samples its reader reported; the images expected in all are those of the
    complete shards, the samples of the shards read so far, and for the others the mean
    of those read (a reader reports a shard once it has read all of it, well before its
    rows are all written)."""

    def __init__(
        self,
        store: Store | str,
        shards: int,
        complete: int,
        skipped: int,
        already: dict[str, int] | None = None,
    ):
        self.store = as_store(store)
        self.already = dict(already or {})  # rows before this run, per shard to do
        self.todo = shards - complete
        self.record = {
            "started": time.time(),
            "shards": shards,  # in this run's inputs
            "complete_at_start": complete,  # of those, complete before it started
            "skipped": skipped,  # rows already in the output for them
            "shards_done": complete,
            "expected": None,  # images in all, estimated (see the class doc)
            "ok": 0,
            "errors": 0,
            "masks": 0,
            "history": [],  # [time, images written by this run] per write, oldest first
            "rows_time": time.time(),  # when the run last wrote rows (its start at first)
        }

    def update(
        self,
        ok: int = 0,
        errors: int = 0,
        masks: int = 0,
        written: dict[str, Counter] | None = None,
        samples: dict[str, int] | None = None,
        force: bool = False,
    ) -> None:
        """Record this run's counts so far, when `force`d or INTERVAL_S after the last
        write. `written`: its files' rows per (shard, status) (pipeline.summary.Tally);
        `samples`: per shard read to its end, its samples (the readers' reports)."""
        if force or time.time() - self.record.get("time", 0) >= INTERVAL_S:
            self.write(ok, errors, masks, written or {}, samples or {})

    def write(
        self, ok: int, errors: int, masks: int, written: dict[str, Counter], samples: dict
    ) -> None:
        """Write the counts now (one PUT)."""
        now = time.time()
        record = self.record
        if ok + errors > record["ok"] + record["errors"]:
            record["rows_time"] = now
        rows = Counter(self.already)
        for name, counts in written.items():
            if name.startswith(f"{output.IMAGES_DIR}/"):  # not the masks files
                for (shard, _), n in counts.items():
                    rows[shard] += n
        done = sum(1 for shard, n in samples.items() if rows[shard] >= n)
        if samples:
            unread = max(0, self.todo - len(samples))
            complete_rows = record["skipped"] - sum(self.already.values())
            mean = sum(samples.values()) / len(samples)
            record["expected"] = round(complete_rows + sum(samples.values()) + unread * mean)
        shards_done = record["complete_at_start"] + done
        record.update(time=now, ok=ok, errors=errors, masks=masks, shards_done=shards_done)
        record["history"] = [*record["history"], [now, ok + errors]][-HISTORY:]
        self.store.write_text(PROGRESS, json.dumps(record, sort_keys=True))


@dataclass
class OutputProgress:
    """What `gemlabel status OUT` shows (see the module doc); None where unknown."""

    out: str
    status: str
    run_status: str | None = None  # the manifest's status
    shards: int | None = None
    shards_done: int | None = None
    images: int | None = None  # in the output for the run's shards (earlier runs' included)
    ok: int | None = None
    errors: int | None = None
    masks: int | None = None
    recent_images: int | None = None  # written in the last `recent_seconds`
    recent_seconds: float | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None
    updated_seconds_ago: float | None = None  # since the driver's last progress write
    holder: dict | None = None  # the newest lock claim: host, pid, heartbeat, released
    heartbeat_seconds_ago: float | None = None
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """The lines `gemlabel status` prints."""
        lines = [f"{self.out}: {self.status}" + (f" ({self.message})" if self.message else "")]
        if self.shards is not None:
            lines.append(f"  shards   {self.shards_done} / {self.shards} done")
        if self.images is not None:
            lines.append(
                f"  images   {self.images} ({self.ok} ok, {self.errors} error), {self.masks} masks"
            )
        if self.images_per_second is not None:
            lines.append(
                f"  rate     {self.recent_images} images in the last "
                f"{_duration(self.recent_seconds)}: {self.images_per_second:.1f} images/s"
                + (f", ETA {_duration(self.eta_seconds)}" if self.eta_seconds is not None else "")
            )
        if self.updated_seconds_ago is not None and self.status in ("running", "stalled"):
            lines.append(f"  updated  {_duration(self.updated_seconds_ago)} ago")
        if self.holder is not None:
            state = "released" if self.holder.get("released") else "held"
            lines.append(
                f"  lock     {state} by host {self.holder.get('host')}, pid "
                f"{self.holder.get('pid')}, heartbeat {_duration(self.heartbeat_seconds_ago)} ago"
            )
        return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _rate(record: dict) -> tuple[int, float, float] | None:
    """Images written over the history's span, that span, and the rate; None with fewer
    than two writes."""
    history = record.get("history") or []
    if len(history) < 2 or history[-1][0] <= history[0][0]:
        return None
    (t0, n0), (t1, n1) = history[0], history[-1]
    return n1 - n0, t1 - t0, (n1 - n0) / (t1 - t0)


def output_progress(store: Store | str, now: float | None = None) -> OutputProgress:
    """The progress of the output at `store` (see the module doc); NotAnOutputError when it
    holds none."""
    store = as_store(store)
    now = time.time() if now is None else now
    with explained(store):  # credentials, endpoint, bucket: one line naming the URL
        manifest = output.require_output(store) or {}
        text = store.read_text(PROGRESS)
        claim = newest_claim(store)
    record = json.loads(text) if text else None
    p = OutputProgress(out=store.display(), status="incomplete", run_status=manifest.get("status"))
    if claim is not None:
        p.holder = {k: claim.get(k) for k in ("host", "pid", "heartbeat", "released")}
        p.heartbeat_seconds_ago = now - float(claim.get("heartbeat", 0))
    live = claim is not None and not claim.get("released")
    live = live and p.heartbeat_seconds_ago < LOCK_STALE_S
    ended = not live and manifest.get("totals") is not None
    if ended:  # the run wrote its final counts
        totals, shards = manifest["totals"], manifest.get("shards") or {}
        p.images, p.ok, p.errors, p.masks = (
            totals.get(k) for k in ("images", "ok", "errors", "masks")
        )
        p.shards, p.shards_done = len(shards), sum(1 for s in shards.values() if s["complete"])
    elif record is not None:
        p.shards, p.shards_done = record["shards"], record["shards_done"]
        p.ok, p.errors, p.masks = record["ok"], record["errors"], record["masks"]
        p.images = record["skipped"] + p.ok + p.errors
        p.updated_seconds_ago = now - record.get("time", record["started"])
        rate = _rate(record) if live else None
        if rate is not None:
            p.recent_images, p.recent_seconds, p.images_per_second = rate
            expected = record.get("expected")
            if p.images_per_second > 0 and expected is not None:
                p.eta_seconds = max(0, expected - p.images) / p.images_per_second
    status = manifest.get("status")
    if live:
        quiet = now - record["rows_time"] if record is not None else 0.0
        p.status = "stalled" if quiet > STALLED_S else "running"
        if p.status == "stalled":
            p.message = f"no new rows for {_duration(quiet)}"
    elif status == "complete":
        p.status = "complete"
    elif status == "stalled":
        p.status, p.message = "stalled", "the run ended stalled; rerun the same command to resume"
    elif status in FAILED:
        p.status, p.message = "failed", f"run {status}; see manifest.json's message"
    else:
        p.status = "incomplete"
        p.message = "no run is writing it; rerun the same command to resume"
    return p
