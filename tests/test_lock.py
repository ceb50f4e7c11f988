"""One writer at a time per output: the lock's refusals, take-overs, heartbeat, loss and the
exclusive create it rests on, on a local disk, memory, S3 and GCS."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.storage import lock as lock_module
from pipeline.storage.lock import LOCK_DIR, LockLostError, OutputLock, OutputLockedError
from pipeline.storage.store import Store

SERVERS = {"s3": "s3_server", "gs": "gcs_server"}  # fixtures of tests/conftest.py


def claims(out) -> list[dict]:
    """The claims in `out/_lock/`, oldest first (not the temp files of a heartbeat being
    written beside them)."""
    directory = os.path.join(out, LOCK_DIR)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    names = [n for n in names if n.endswith(".json") and not n.startswith(".")]
    return [json.loads(open(os.path.join(directory, n)).read()) for n in names]


def write_claim(out, generation: int, **claim) -> None:
    """A claim written whole, as runs write them."""
    path = os.path.join(out, LOCK_DIR, f"{generation:012d}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump({"id": "x", "host": "elsewhere", "pid": 1, **claim}, f)
    os.replace(path + ".part", path)


def hold_lock(out: str) -> subprocess.Popen:
    """Another process that holds `out`'s lock until its stdin closes."""
    code = (
        "import sys; from pipeline.storage.lock import OutputLock\n"
        f"with OutputLock({out!r}):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_same_host_refused_while_alive_taken_over_once_killed(tmp_path):
    out = str(tmp_path / "out")
    holder = hold_lock(out)
    with pytest.raises(OutputLockedError, match=f"another gemlabel run .*pid {holder.pid}"):
        with OutputLock(out):
            pass
    holder.kill()  # SIGKILL: its claim stays behind, but its process is gone
    holder.wait()
    assert claims(out)[-1]["pid"] == holder.pid
    with OutputLock(out) as lock:  # taken over at once, as the next generation
        assert lock.generation == 2 and [c["pid"] for c in claims(out)] == [os.getpid()]
    assert claims(out)[-1]["released"]  # released at the end, never deleted

    holder = hold_lock(out)
    holder.communicate("")  # a run that ends releases its lock
    assert holder.returncode == 0 and claims(out)[-1]["released"]
    assert len(claims(out)) == 1  # older claims are removed by the next holder


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(lock_module, "POLL_S", 0.05)
    monkeypatch.setattr(lock_module, "LOCK_STALE_S", 1.0)
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.1)


def test_other_host_refused_once_its_heartbeat_moves(tmp_path, fast):
    write_claim(tmp_path, 7, heartbeat=time.time())
    stop = threading.Event()

    def beat():  # the other host's live run
        while not stop.wait(0.2):
            write_claim(tmp_path, 7, heartbeat=time.time())

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(OutputLockedError, match="host elsewhere"):
            with OutputLock(str(tmp_path)):
                pass
    finally:
        stop.set()
        beating.join()
    assert [c["host"] for c in claims(tmp_path)] == ["elsewhere"]


def test_other_host_taken_over_once_its_heartbeat_is_stale(tmp_path, fast):
    write_claim(tmp_path, 7, heartbeat=time.time())  # a run that died just now, elsewhere
    start = time.time()
    with OutputLock(str(tmp_path)) as lock:
        waited = time.time() - start
        assert lock.generation == 8 and claims(tmp_path)[-1]["host"] == socket.gethostname()
    assert waited >= 0.9  # it waited for the heartbeat to go stale


def test_heartbeat_refreshes_the_claim(tmp_path, fast):
    with OutputLock(str(tmp_path)):
        first = claims(tmp_path)[-1]["heartbeat"]
        deadline = time.time() + 10
        while claims(tmp_path)[-1]["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert claims(tmp_path)[-1]["heartbeat"] > first


def test_same_host_recycled_pid_is_not_the_run(tmp_path):
    """A live pid that started at another time (a restarted container reusing the number)
    does not hold the lock; the same pid with its own start time does."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    write_claim(tmp_path, 1, **me, started=lock_module._started(os.getpid()))
    with pytest.raises(OutputLockedError):
        with OutputLock(str(tmp_path)):
            pass
    write_claim(tmp_path, 1, **me, started="another-boot:1")
    with OutputLock(str(tmp_path)) as lock:
        assert lock.generation == 2


def test_a_newer_claim_takes_the_lock_and_the_run_stops(tmp_path, fast):
    """A holder whose claim was superseded (it stalled; another run took over) finds out at
    its next heartbeat: `check` raises naming the new holder, nothing is refreshed or
    released any more."""
    with OutputLock(str(tmp_path)) as lock:
        write_claim(tmp_path, lock.generation + 1, heartbeat=time.time(), pid=4242)
        deadline = time.time() + 10
        while lock.lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockLostError, match="took it over .*host elsewhere, pid 4242"):
            lock.check()
        mine = claims(tmp_path)[0]["heartbeat"]
        time.sleep(0.3)  # three beats' worth: ours is left alone
        assert claims(tmp_path)[0]["heartbeat"] == mine
    assert not claims(tmp_path)[0].get("released") and claims(tmp_path)[-1]["pid"] == 4242


def test_a_heartbeat_that_cannot_be_written_loses_the_lock(tmp_path, fast, caplog):
    """A failed write is logged and retried; after LOCK_STALE_S - HEARTBEAT_S of failures the
    run gives the lock up itself (another may take over by then)."""
    out = tmp_path / "out"
    with OutputLock(str(out)) as lock:
        out.rename(tmp_path / "moved")
        out.write_text("not a directory")  # every listing and write now fails
        deadline = time.time() + 10
        while lock.lost is None and time.time() < deadline:
            time.sleep(0.05)
        assert "could not refresh" in caplog.text
        with pytest.raises(LockLostError, match="could not be written"):
            lock.check()
        out.unlink()
        (tmp_path / "moved").rename(out)


def test_gcs_create_sends_the_generation_precondition(gcs_server):
    """fake-gcs-server does not honour ifGenerationMatch on every upload kind; the test proxy
    does. What matters for real GCS: the request carries ifGenerationMatch=0."""
    store = Store(gcs_server.url("precondition"))
    gcs_server.requests.reset()
    assert store.create("claim.json", b"x")
    gcs_server.requests.settle()
    uploads = [r for r in gcs_server.requests.requests if r.kind == "PUT"]
    assert uploads and all(r.query.get("ifGenerationMatch") == "0" for r in uploads)


@pytest.mark.parametrize("backend", ["local", "memory", "s3", "gs"])
def test_twenty_simultaneous_acquisitions_have_one_winner(backend, request, tmp_path):
    """20 threads try to take one output's lock at the same instant: exactly one holds it,
    19 are refused (the winner holds on until every other has tried)."""
    if backend == "local":
        url = str(tmp_path / "out")
    elif backend == "memory":
        url = f"memory://race-{os.urandom(4).hex()}"
    else:
        url = request.getfixturevalue(SERVERS[backend]).url("race")
    start, tried = threading.Barrier(20), threading.Barrier(20)
    won, refused, failed = [], [], []

    def contend() -> None:
        store = Store(url)
        start.wait()
        try:
            with OutputLock(store) as lock:
                won.append(lock.generation)
                tried.wait()
                return
        except OutputLockedError:
            refused.append(1)
        except Exception as err:  # noqa: BLE001 - reported below
            failed.append(err)
        tried.wait()

    threads = [threading.Thread(target=contend) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failed and len(won) == 1 and len(refused) == 19


@pytest.mark.parametrize("backend", ["local", "memory", "s3", "gs"])
def test_create_is_exclusive_on_every_store(backend, request, tmp_path):
    if backend == "local":
        store = Store(str(tmp_path))
    elif backend == "memory":
        store = Store(f"memory://create-{os.urandom(4).hex()}")
    else:
        store = Store(request.getfixturevalue(SERVERS[backend]).url("create"))
    assert store.create("a/claim.json", b"first")
    assert not store.create("a/claim.json", b"second")
    assert store.read("a/claim.json") == b"first"
    assert store.ls("a", temp=True) == []  # no temp file left behind
