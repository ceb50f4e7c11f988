"""One run at a time per output: the lock's refusals, take-overs and heartbeat."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.storage import lock as lock_module
from pipeline.storage.lock import LOCK, OutputLock, OutputLockedError


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
    out, path = str(tmp_path / "out"), tmp_path / "out" / LOCK
    holder = hold_lock(out)
    with pytest.raises(OutputLockedError, match=f"another gemlabel run .*pid {holder.pid}"):
        with OutputLock(out):
            pass
    holder.kill()  # SIGKILL: its lock stays behind, but its process is gone
    holder.wait()
    assert path.exists()
    with OutputLock(out):  # taken over at once
        assert json.loads(path.read_text())["pid"] != holder.pid
    assert not path.exists()  # released at the end

    holder = hold_lock(out)
    holder.communicate("")  # a run that ends releases its lock
    assert holder.returncode == 0 and not path.exists()


def other_host_lock(path, heartbeat: float) -> None:
    """The lock of a run on another host, written whole (as runs write it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"id": "x", "host": "elsewhere", "pid": 1, "heartbeat": heartbeat}))
    os.replace(tmp, path)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(lock_module, "POLL_S", 0.05)
    monkeypatch.setattr(lock_module, "LOCK_STALE_S", 1.0)
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.1)


def test_other_host_refused_once_its_heartbeat_moves(tmp_path, fast):
    path = tmp_path / LOCK
    other_host_lock(path, time.time())
    stop = threading.Event()

    def beat():  # the other host's live run
        while not stop.wait(0.2):
            other_host_lock(path, time.time())

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(OutputLockedError, match="host elsewhere"):
            with OutputLock(str(tmp_path)):
                pass
    finally:
        stop.set()
        beating.join()
    assert json.loads(path.read_text())["host"] == "elsewhere"


def test_other_host_taken_over_once_its_heartbeat_is_stale(tmp_path, fast):
    path = tmp_path / LOCK
    other_host_lock(path, time.time())  # a run that died just now, elsewhere
    start = time.time()
    with OutputLock(str(tmp_path)):
        waited = time.time() - start
        assert json.loads(path.read_text())["host"] != "elsewhere"
    assert waited >= 0.9  # it waited for the heartbeat to go stale


def test_heartbeat_refreshes_the_lock(tmp_path, fast):
    path = tmp_path / LOCK
    with OutputLock(str(tmp_path)):
        first = json.loads(path.read_text())["heartbeat"]
        deadline = time.time() + 10
        while json.loads(path.read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["heartbeat"] > first


def test_same_host_recycled_pid_is_not_the_run(tmp_path):
    """A live pid that started at another time (a restarted container reusing the number)
    does not hold the lock; the same pid with its own start time does."""
    path = tmp_path / LOCK
    me = {"id": "x", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    path.write_text(json.dumps({**me, "started": lock_module._started(os.getpid())}))
    with pytest.raises(OutputLockedError):
        with OutputLock(str(tmp_path)):
            pass
    path.write_text(json.dumps({**me, "started": "another-boot:1"}))
    with OutputLock(str(tmp_path)):
        assert json.loads(path.read_text())["id"] != "x"


def test_heartbeat_stops_when_taken_over_and_survives_a_failed_write(tmp_path, fast, caplog):
    out = tmp_path / "out"
    path = out / LOCK
    with OutputLock(str(out)):
        # a write that fails (the directory replaced by a file) is logged and retried
        out.rename(tmp_path / "moved")
        out.write_text("not a directory")
        deadline = time.time() + 10
        while "could not refresh" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
        assert "could not refresh" in caplog.text
        out.unlink()
        (tmp_path / "moved").rename(out)
        first = json.loads(path.read_text())["heartbeat"]
        while json.loads(path.read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["heartbeat"] > first  # beating again
        # another run took the lock over: this one stops refreshing and leaves it alone
        other_host_lock(path, 1.0)
        while "taken over" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
        assert "taken over by another run" in caplog.text
        time.sleep(0.3)  # three more beats' worth
        assert json.loads(path.read_text())["host"] == "elsewhere"
    assert json.loads(path.read_text())["host"] == "elsewhere"  # not removed at the end
