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


# fencing: a rank whose run no longer holds the directory writes nothing -----------------------------------
FENCED_WRITE = """
import sys
from pathlib import Path
from autosam2.engine import run_lock
from autosam2.tracking.outbox import Outbox
out = Path(sys.argv[1])
run_lock.arm(out, sys.argv[2], rank=1)
Outbox(out / "tracking").append({"op": "metric", "step": 7})
print("appended", flush=True)
"""


def fenced_write(folder, token: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_JOB_ID": "3", "SLURM_RESTART_COUNT": "0"}
    return subprocess.run(
        [sys.executable, "-c", FENCED_WRITE, str(folder), token], capture_output=True, text=True, env=env
    )


def test_a_rank_of_an_incarnation_that_lost_the_lock_leaves_in_one_line_writing_nothing(tmp_path):
    write_lock(tmp_path, slurm_job_id="3", restart_count=1, token="later-incarnation")
    done = fenced_write(tmp_path, "older-incarnation")
    assert done.returncode == run_lock.EXIT_FENCED, done.stderr
    assert "appended" not in done.stdout
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("rank 1 of SLURM job 3 (restart 0): not writing (a tracking record) into ")
    assert "SLURM job 3 (restart 1)" in line
    assert (
        not list((tmp_path / "tracking").glob("*.jsonl"))
        or not (tmp_path / "tracking" / "outbox.jsonl").read_text().strip()
    )
    ours = fenced_write(tmp_path, "later-incarnation")  # the holder itself writes
    assert ours.returncode == 0 and "appended" in ours.stdout, ours.stderr


def test_the_fence_after_release_lets_the_last_run_finish_and_stops_older_ones(tmp_path):
    lock = RunLock(tmp_path).acquire()
    token = lock.record["token"]
    run_lock.arm(tmp_path, token, rank=0)
    try:
        assert run_lock.fenced() is None
        lock.release()
        assert not (tmp_path / LOCK_NAME).exists()
        assert json.loads((tmp_path / run_lock.LAST_NAME).read_text())["token"] == token
        assert run_lock.fenced() is None  # its own run ended: its ranks still wind down
        later = RunLock(tmp_path).acquire()
        assert "held by another job" in run_lock.fenced()
        later.release()
        assert "has ended and another run held the directory since" in run_lock.fenced()
    finally:
        run_lock.disarm()
    assert run_lock.fenced() is None  # nothing armed: every write goes on (evaluate, tests)


def test_the_heartbeat_never_touches_a_lock_another_run_took(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, age_s=1000, token="another")
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime > 900
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "another"  # not ours: left


# the reservation of a submission ----------------------------------------------------------------------
def fake_squeue(tmp_path, monkeypatch, state: str) -> None:
    """A stub of SLURM's squeue (the only scheduler command asked) answering `state` for any job; "" for
    a job it no longer knows."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    answer = (
        f"echo {state}" if state else "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
    )
    (bin_dir / "squeue").write_text(f"#!/bin/sh\n{answer}\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_reservation_refuses_a_second_submission_while_its_job_is_pending(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    first = run_lock.reserve(out, "slurm")
    with pytest.raises(OutputDirInUse, match="reserved by a job being submitted"):
        run_lock.reserve(out, "slurm")  # its submission (this process) is under way
    first.set_job("77")
    fake_squeue(tmp_path, monkeypatch, "PENDING")
    with pytest.raises(
        OutputDirInUse, match=r"run: reserved by job 77 \(slurm\), submitted from .*pending or running"
    ):
        run_lock.reserve(out, "slurm")
    with pytest.raises(OutputDirInUse, match="job 77"):
        run_lock.check_reserved(out)
    with pytest.raises(OutputDirInUse, match="job 77"):
        run_lock.check_reserved_for_me(out)  # a run started by hand while job 77 waits
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    run_lock.check_reserved_for_me(out)  # job 77 itself (after a requeue too)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv(run_lock.RESERVATION_VARIABLE, first.record["token"])
    run_lock.check_reserved_for_me(out)  # the job of that submission, before its id was written
    fake_squeue(tmp_path, monkeypatch, "COMPLETED")
    second = run_lock.reserve(out, "slurm")
    assert second.took_over == f"{out}: took over the reservation of job 77 (slurm), submitted from " + (
        f"{first.record['host']} at {first.record['submitted']}: it has ended"
    )
    second.cancel()
    assert not (out / run_lock.RESERVATION_NAME).exists()


def test_a_finished_run_drops_its_reservation_and_a_stopped_one_keeps_it(tmp_path, monkeypatch):
    reservation = run_lock.reserve(tmp_path, "local")
    monkeypatch.setenv(run_lock.RESERVATION_VARIABLE, reservation.record["token"])
    RunLock(tmp_path).acquire().release()  # stopped by a signal: the requeued job comes back
    assert (tmp_path / run_lock.RESERVATION_NAME).exists()
    RunLock(tmp_path).acquire().release(reservation=True)
    assert not (tmp_path / run_lock.RESERVATION_NAME).exists()


LOSING_JOB = """
import sys
from pathlib import Path
import torch
from autosam2.engine.dist import DistInfo
from autosam2.engine.run_lock import take_output_dir
take_output_dir(Path(sys.argv[1]), DistInfo(0, 1, 0, torch.device("cpu")))
print("took it", flush=True)
"""


def test_a_job_that_loses_the_race_exits_in_one_line(tmp_path):
    proc = holder_process(tmp_path)
    try:
        env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "12"}
        done = subprocess.run(
            [sys.executable, "-c", LOSING_JOB, str(tmp_path)], capture_output=True, text=True, env=env
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert done.returncode == 1 and "took it" not in done.stdout
    (line,) = done.stderr.strip().splitlines()  # no traceback, and no result file for submitit
    assert line.startswith(f"rank 0: {tmp_path}: in use by another run (pid {proc.pid} on ")
