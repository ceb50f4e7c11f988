"""`gemlabel status OUT`: progress read from the output alone (pipeline.tools.progress),
on a running output (a real lock held, the driver's real progress writer) and a finished
one, on a local disk, S3 (SeaweedFS) and GCS (fake-gcs-server)."""

import json
import time
from collections import Counter

import pytest

from jobs.cli import main
from pipeline.storage import output
from pipeline.storage.lock import OutputLock
from pipeline.tools.progress import (
    HISTORY,
    INTERVAL_S,
    PROGRESS,
    STALLED_S,
    ProgressLog,
    output_progress,
)


@pytest.fixture(params=["local", "s3", "gs"])
def out_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return server.url()


# what a driver has written after a minute: shards s0-s2 complete, s3 read to its end
WRITTEN = {
    "images/a.parquet": Counter({("s0", "ok"): 100, ("s1", "ok"): 100, ("s2", "ok"): 90}),
    "images/b.parquet": Counter({("s2", "error"): 10}),
    "masks/a.parquet": Counter({("s0",): 900}),  # masks files are no rows
}
SAMPLES = {"s0": 100, "s1": 100, "s2": 100, "s3": 100}


def _running(url: str) -> tuple[OutputLock, ProgressLog]:
    """An output as a running driver leaves it: the manifest "incomplete", the lock held
    (heartbeat thread running), two progress writes a minute apart: 10 shards, 2 complete
    before the run (200 rows), 3 more now, 4 read of the 8 to do."""
    lock = OutputLock(url).__enter__()
    output.write_manifest(url, {"status": "incomplete", "inputs": ["x-{0..9}.tar"]})
    log = ProgressLog(url, shards=10, complete=2, skipped=200)
    log.update(force=True)
    log.record["history"][-1][0] -= 60  # the first write, a minute ago
    log.record["started"] -= 60
    log.write(290, 10, 900, WRITTEN, SAMPLES)
    return lock, log


def test_running_then_stalled_then_incomplete(out_url, capsys):
    lock, log = _running(out_url)
    try:
        p = output_progress(out_url)
        assert p.status == "running" and p.run_status == "incomplete"
        assert (p.shards, p.shards_done) == (10, 5)
        assert (p.images, p.ok, p.errors, p.masks) == (500, 290, 10, 900)
        assert p.recent_images == 300 and p.images_per_second == pytest.approx(5, rel=0.05)
        # expected: 200 + 4 x 100 read + 4 x 100 unread = 1000; 500 left at 5 images/s
        assert p.eta_seconds == pytest.approx(100, rel=0.05)
        assert p.holder["pid"] == lock.owner["pid"] and not p.holder["released"]
        assert p.heartbeat_seconds_ago < 30
        assert main(["status", out_url]) == 0
        text = capsys.readouterr().out
        assert f"{out_url}: running" in text and "5 / 10 done" in text
        assert "500 (290 ok, 10 error), 900 masks" in text and "ETA" in text
        assert main(["status", out_url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["shards_done"] == 5
        # no new rows for longer than STALLED_S while the lock is alive: stalled
        log.record["rows_time"] -= STALLED_S + 30
        log.write(290, 10, 900, WRITTEN, SAMPLES)
        stalled = output_progress(out_url)
        assert stalled.status == "stalled" and "no new rows for 10 min" in stalled.message
        assert main(["status", out_url]) == 1
    finally:
        lock.__exit__(None, None, None)
    p = output_progress(out_url)  # released, never finished: a rerun resumes
    assert p.status == "incomplete" and p.holder["released"]
    assert p.images_per_second is None and "rerun" in p.message
    assert main(["status", out_url]) == 1


def test_finished_output_shows_the_manifest_counts(out_url, capsys):
    lock, _ = _running(out_url)
    lock.__exit__(None, None, None)
    shards = {f"x-{i}.tar": {"complete": i < 9} for i in range(10)}
    totals = {"images": 1000, "ok": 990, "errors": 10, "masks": 3000}
    for status, shown, code in [
        ("complete", "complete", 0),
        ("aborted", "failed", 1),
        ("failed", "failed", 1),
        ("stalled", "stalled", 1),
        ("incomplete", "incomplete", 1),
    ]:
        output.write_manifest(out_url, {"status": status, "totals": totals, "shards": shards})
        p = output_progress(out_url)
        assert (p.status, p.shards, p.shards_done, p.images, p.masks) == (shown, 10, 9, 1000, 3000)
        assert main(["status", out_url]) == code
        assert f"{out_url}: {shown}" in capsys.readouterr().out


def test_status_is_a_few_requests_however_large_the_output(s3_server, capsys):
    """Four reads (manifest, progress, the lock's listing, the newest claim): 6 requests on
    S3, where s3fs sends a HEAD before a file's GET; never a listing of images/ or masks/,
    here 300 files."""
    url = s3_server.url()
    lock, _ = _running(url)
    try:
        store = output.Store(url)
        for i in range(150):
            store.write(f"images/{i:04d}.parquet", b"x")
            store.write(f"masks/{i:04d}.parquet", b"x")
        s3_server.requests.settle()
        s3_server.requests.reset()
        p = output_progress(url)
        s3_server.requests.settle()
        requests = s3_server.requests.requests
    finally:
        lock.__exit__(None, None, None)
    assert p.status == "running"
    kinds = [(r.kind, r.path) for r in requests]
    assert len(requests) == 6, kinds
    assert sorted(kind for kind, _ in kinds) == ["GET"] * 3 + ["HEAD"] * 2 + ["LIST"], kinds
    assert not any("/images" in path or "/masks" in path for _, path in kinds), kinds


def test_status_of_what_is_not_an_output(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_status_of_a_real_run_while_it_runs_and_after(backend, tmp_path, request, capsys):
    """A real `gemlabel run` in another process: `status` says running (its lock, its
    progress record) while it labels, then complete with the manifest's counts."""
    import os
    import subprocess
    import sys

    from tests.shards import write_good_shards

    if backend == "s3":
        out = request.getfixturevalue("s3_server").url()
    else:
        out = str(tmp_path / "out")
    shards = write_good_shards(tmp_path / "shards", n_shards=6, per_shard=8)
    (tmp_path / "v.txt").write_text("cat\ndog\ncar\n")
    args = [sys.executable, "-m", "jobs.cli", "run", *shards, "--vocab", str(tmp_path / "v.txt")]
    args += ["--out", out, "--model", "gemlabel-toy", "--image-size", "64", "--batch-size", "1"]
    args += ["--num-cpus", "2", "--rows-per-file", "1"]
    proc = subprocess.Popen(args, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            p = output_progress(out)
        except output.NotAnOutputError:  # not created yet
            time.sleep(0.3)
            continue
        if p.status == "running" and p.shards is not None:
            seen.append(p)
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert seen, "never seen running"
    running = seen[0]
    assert running.shards == 6 and running.holder["pid"] == proc.pid
    assert running.heartbeat_seconds_ago < 30 and not running.holder["released"]
    done = output_progress(out)
    assert (done.status, done.shards, done.shards_done, done.images) == ("complete", 6, 6, 48)
    assert done.holder["released"]
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    assert f"{out}: complete" in text and "6 / 6 done" in text and "48 (48 ok, 0 error)" in text
    print(running.format(), text, sep="\n")


def test_progress_log_writes_at_most_once_an_interval(tmp_path):
    """The driver calls `update` for every batch; the record is written (one PUT) when
    forced or INTERVAL_S after the last write, keeping the last HISTORY writes."""
    url = str(tmp_path / "out")
    log = ProgressLog(url, shards=4, complete=1, skipped=12, already={"s1": 2})
    log.update(force=True)
    first = (tmp_path / "out" / PROGRESS).read_text()
    written = {"images/a.parquet": Counter({("s1", "ok"): 3, ("s2", "ok"): 1})}
    samples = {"s1": 5, "s2": 6}
    log.update(4, 0, 9, written, samples)  # within the interval: not written
    assert (tmp_path / "out" / PROGRESS).read_text() == first
    log.record["time"] -= INTERVAL_S
    log.update(4, 0, 9, written, samples)
    record = json.loads((tmp_path / "out" / PROGRESS).read_text())
    # s1: 2 rows before, 3 now, of 5: done; s2 not; s0 complete before the run (10 rows);
    # expected: 10 + 5 + 6 read + 1 unread shard at their mean 5.5
    assert (record["ok"], record["shards_done"], len(record["history"])) == (4, 2, 2)
    assert record["expected"] == round(10 + 11 + 5.5)
    for i in range(2 * HISTORY):
        log.write(5 + i, 0, 9, written, samples)
    assert len(log.record["history"]) == HISTORY
