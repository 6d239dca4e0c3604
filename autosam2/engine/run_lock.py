"""One run per output directory: a lock file held by rank 0 for the whole run.

``OUT/run.lock`` records who holds it (host, pid and its start time, SLURM job id) and is touched every
`HEARTBEAT_S` seconds. A new run takes it over only from a holder that is gone: a process of this host
that no longer exists, the same SLURM job (a requeued job), a SLURM job that `squeue` no longer knows,
or a lock without a heartbeat for `STALE_AFTER_S` seconds (a holder on another host that died).
Anything else is one OutputDirInUse error naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosam2.config import ConfigError
from autosam2.errors import OutputDirInUse

if TYPE_CHECKING:
    from autosam2.engine.dist import DistInfo

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no such process, or psutil missing: the caller treats None as "gone"
        return None


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "token": uuid.uuid4().hex,
    }


ENDED_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"
}  # fmt: skip


def _slurm_job_active(job_id: str) -> bool | None:
    """True/False when `squeue` answers (an ended job may still be listed a while, in an ended state),
    None when it cannot be asked."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    states = set(out.stdout.split())
    return bool(states - ENDED_STATES)


def why_stale(holder: dict[str, Any], age_s: float) -> str | None:
    """Why the holder is gone (its lock may be taken), or None while it may be alive."""
    if not isinstance(holder.get("host"), str) or not isinstance(holder.get("pid"), int):
        return "its lock file was never completed or is damaged"
    mine = os.environ.get("SLURM_JOB_ID")
    job = str(holder.get("slurm_job_id") or "")
    if job and mine and job == mine:
        return f"it was this SLURM job ({job}) before a requeue"
    if holder.get("host") == socket.gethostname():
        start = _process_start(holder["pid"])
        recorded = holder.get("pid_start")
        if start is None or (isinstance(recorded, (int, float)) and abs(start - recorded) > 1):
            return f"process {holder.get('pid')} of this host is gone"
        return None
    if job and _slurm_job_active(job) is False:
        return f"SLURM job {job} has ended"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


def read_holder(folder: str | Path) -> tuple[dict[str, Any], float] | None:
    """The lock's record and seconds since its last heartbeat, or None when there is no lock. A record
    that cannot be read (garbage, not a JSON object) comes back as {}: nobody holds it."""
    path = Path(folder) / LOCK_NAME
    for _ in range(20):  # a holder between creating the file and writing it: wait a moment
        try:
            data = path.read_bytes()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
            return (record if isinstance(record, dict) else {}), age
        except ValueError:  # UnicodeDecodeError included
            if age > 5:
                return {}, age
            time.sleep(0.1)
    return {}, STALE_AFTER_S + 1


def describe(holder: dict[str, Any], age_s: float) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}, "
        f"last heartbeat {age_s:.0f} s ago"
    )


def check_free(folder: str | Path) -> None:
    """Raise OutputDirInUse if a live run holds `folder` (for launchers, before submitting)."""
    found = read_holder(folder)
    if found is not None and why_stale(*found) is None:
        raise OutputDirInUse(_in_use(Path(folder), *found))


def _in_use(folder: Path, holder: dict[str, Any], age_s: float) -> str:
    return (
        f"{folder}: in use by another run ({describe(holder, age_s)}); stop it or choose another output "
        f"directory (a lock without heartbeat for {STALE_AFTER_S:.0f} s is taken over; {folder / LOCK_NAME})"
    )


class RunLock:
    """Hold ``folder/run.lock`` from `acquire` to `release` (also a context manager)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self.took_over: str | None = None  # why a stale lock was taken, for the log

    def acquire(self) -> RunLock:
        record = _me()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_holder(self.path.parent)
                if found is None:
                    continue  # released meanwhile
                reason = why_stale(*found)
                if reason is None:
                    raise OutputDirInUse(_in_use(self.path.parent, *found)) from None
                # move it aside under a name of our own: of two runs taking it over, one wins the rename
                aside = self.path.with_name(f".{LOCK_NAME}.stale-{record['token']}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                self.took_over = f"took over {self.path} from {describe(*found)}: {reason}"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.record = record
            threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()
            return self
        raise OutputDirInUse(f"{self.path}: could not take the lock (other runs keep taking it)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        self._stop.set()
        if self.record is None:
            return
        try:
            if json.loads(self.path.read_text()).get("token") == self.record["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.record = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_output_dir(out: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 creates the output directory and takes its lock; every rank raises rank 0's error (an
    unwritable directory as a ConfigError naming `train.output_dir`, a live holder as OutputDirInUse)."""
    from autosam2.engine.dist import broadcast_object  # here: the launcher's check_free needs no torch

    lock, error = None, None
    if info.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(0, "it is a file, not a directory")
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
        except OSError as err:
            error = ConfigError(f"train.output_dir={out}: cannot write there ({err.strerror or err})")
        except OutputDirInUse as err:
            error = err
        if lock is not None and lock.took_over:
            print(f"warning: {lock.took_over}", file=sys.stderr, flush=True)
    error = broadcast_object(error)
    if error is not None:
        raise error
    return lock
