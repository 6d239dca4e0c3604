"""One run per output directory: the lock, its holder, and when a new run may take it over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from autosam2.engine import run_lock
from autosam2.engine.run_lock import LOCK_NAME, RunLock, check_free
from autosam2.errors import OutputDirInUse

HOLD = "import sys, time; from autosam2.engine.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def holder_process(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def write_lock(folder, age_s: float = 0.0, **record) -> None:
    path = folder / LOCK_NAME
    path.write_text(
        json.dumps({"host": "node-elsewhere", "pid": 1, "started": "then", "token": "x", **record})
    )
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_the_lock_is_held_for_the_run_and_released(tmp_path):
    lock = RunLock(tmp_path).acquire()
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["token"] == lock.record["token"]
    with pytest.raises(OutputDirInUse, match=rf"pid {os.getpid()} on .*{LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    proc = holder_process(tmp_path)
    try:
        with pytest.raises(OutputDirInUse, match=rf"in use by another run \(pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
        with pytest.raises(OutputDirInUse):
            check_free(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    check_free(tmp_path)  # kill -9 left the file, but its holder is gone
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over and f"process {proc.pid} of this host is gone" in lock.took_over
    lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    import socket

    write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), pid_start=1.0)  # alive, but younger
    lock = RunLock(tmp_path).acquire()
    assert "is gone" in lock.took_over
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, slurm_job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock(tmp_path).acquire()
    assert "this SLURM job (4242) before a requeue" in lock.took_over
    lock.release()


def test_another_hosts_lock_stands_until_its_heartbeat_stops(tmp_path):
    write_lock(tmp_path, age_s=20)
    with pytest.raises(OutputDirInUse, match="node-elsewhere.*last heartbeat 20 s ago"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, age_s=run_lock.STALE_AFTER_S + 5)
    lock = RunLock(tmp_path).acquire()
    assert "no heartbeat for" in lock.took_over
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh_and_release_spares_anothers_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    lock = RunLock(tmp_path).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.monotonic() + 10
    while time.time() - path.stat().st_mtime > 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 50
    write_lock(tmp_path)  # someone took it over meanwhile
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-elsewhere"


def test_a_lock_file_never_written_is_not_held(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")
    os.utime(path, (time.time() - 60, time.time() - 60))
    RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize(
    "content", [b"\xd0\x9f\xff garbage", b"[1]", b"null", b'{"host": "vm", "pid": "abc"}'], ids=str
)
def test_a_damaged_lock_file_is_taken_over(tmp_path, content):
    (tmp_path / LOCK_NAME).write_bytes(content)
    lock = RunLock(tmp_path).acquire()
    assert "never completed or is damaged" in lock.took_over
    lock.release()
