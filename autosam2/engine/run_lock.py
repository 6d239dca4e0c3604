"""One run per output directory: a lock file held by rank 0 for the whole run.

``OUT/run.lock`` records who holds it (host, pid and its start time, SLURM job id) and is touched every
`HEARTBEAT_S` seconds. A new run takes it over only from a holder that is gone: a process of this host
that no longer exists, the same SLURM job (a requeued job), a SLURM job that `squeue` no longer knows,
or a lock without a heartbeat for `STALE_AFTER_S` seconds (a holder on another host that died).
Anything else is one OutputDirInUse error naming the holder. A released lock is renamed to
``OUT/.run.lock.last``, the record of the run that held it last.

Fencing: rank 0 shares the token of its lock with every rank (`take_output_dir`), and each write into
the run (a checkpoint, a tracking record, the final weights, the error or result of the job) first asks
`guard`, which reads the lock: a rank whose run no longer holds it (another job, or a later incarnation
of the same requeued job, took it; or the run ended and another one held it since) prints one line and
leaves with `os._exit`, so nothing else of it is written, not even submitit's result file.

Reservation: `python -m launch` writes ``OUT/run.reserved`` (token, submission host and time, then the
job id) before it submits (`reserve`); a second submission is refused while the reserving job is pending
or running, and a job other than the reserving one refuses to start in the directory.
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
LAST_NAME = ".run.lock.last"  # the record of the run that released the lock last
RESERVATION_NAME = "run.reserved"
RESERVATION_VARIABLE = "AUTOSAM2_RESERVATION"  # the token of the submission, in the job's environment
EXIT_FENCED = 3  # the exit status of a rank that left because its run no longer holds the lock
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
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
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
    if job and holder.get("restart_count"):
        job += f" (restart {holder['restart_count']})"
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
        """Touch the lock while it is ours; one taken over by another run is left alone."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.record is None or _token_of(self.path) != self.record["token"]:
                    return
                os.utime(self.path)
            except OSError:
                pass

    def release(self, reservation: bool = False) -> None:
        """Give the lock up if it is still ours: it becomes `LAST_NAME`, the record of the last holder.
        `reservation`: the run is over, so its submission's reservation goes too."""
        self._stop.set()
        if self.record is None:
            return
        try:
            if _token_of(self.path) == self.record["token"]:
                os.replace(self.path, self.path.with_name(LAST_NAME))
        except OSError:
            pass
        if reservation:
            drop_reservation(self.path.parent)
        self.record = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _token_of(path: Path) -> str | None:
    """The token of the lock record at `path`; None when there is none or it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("token") if isinstance(record, dict) else None


def take_output_dir(out: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 creates the output directory and takes its lock; every rank raises rank 0's error (an
    unwritable directory as a ConfigError naming `train.output_dir`, a live holder or another job's
    reservation as OutputDirInUse: under a submitit job, one line and exit) and fences its writes with
    the lock's token (`guard`)."""
    from autosam2.engine.dist import broadcast_object  # here: the launcher's check_free needs no torch

    lock, error = None, None
    if info.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(0, "it is a file, not a directory")
            out.mkdir(parents=True, exist_ok=True)
            check_reserved_for_me(out)
            lock = RunLock(out).acquire()
        except OSError as err:
            error = ConfigError(f"train.output_dir={out}: cannot write there ({err.strerror or err})")
        except OutputDirInUse as err:
            error = err
        if lock is not None and lock.took_over:
            print(f"warning: {lock.took_over}", file=sys.stderr, flush=True)
    error, token = broadcast_object((error, lock.record["token"] if lock else None))
    if isinstance(error, OutputDirInUse) and os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        _leave(f"rank {info.rank}: {error}", 1)  # no traceback, no result file: the run is another's
    if error is not None:
        raise error
    arm(out, token, info.rank)
    return lock


# fencing ---------------------------------------------------------------------------------------------
_FENCE: dict[str, Any] = {}  # this process's run: folder, the lock's token, rank


def arm(folder: Path, token: str, rank: int) -> None:
    """From now on `guard` checks that the lock of `folder` is held by `token` (or was, last)."""
    _FENCE.update(folder=Path(folder), token=token, rank=rank)


def disarm() -> None:
    _FENCE.clear()


def fenced() -> str | None:
    """Why this rank's run no longer owns its output directory, or None while it does (or no run is
    armed). Ours: the lock holds our token, or no lock is held and ours was the last."""
    if not _FENCE:
        return None
    folder, token = _FENCE["folder"], _FENCE["token"]
    for _ in range(3):  # a lock released between the two reads: read again
        try:
            found = read_holder(folder)
        except OSError:  # the file system cannot say now: the write goes on, the next one asks again
            return None
        if found is not None:
            holder, age = found
            if holder.get("token") == token or not holder:
                return None  # ours, or a lock being written: the check of the next write decides
            return f"the run is held by another job or incarnation ({describe(holder, age)})"
        last = _token_of(folder / LAST_NAME)
        if last == token:
            return None
        if last is not None:
            return "the run has ended and another run held the directory since"
        if not (folder / LOCK_NAME).exists():
            return f"its lock is gone ({folder / LOCK_NAME} was removed)"
    return None


def guard(what: str = "write") -> None:
    """Before a write into the run: a rank whose run no longer holds the lock leaves at once, in one line
    and with `EXIT_FENCED`, writing nothing else (no error, no result for submitit)."""
    reason = fenced()
    if reason is not None:
        job = os.environ.get("SLURM_JOB_ID")
        who = f"rank {_FENCE['rank']}" + (
            f" of SLURM job {job} (restart {os.environ.get('SLURM_RESTART_COUNT') or 0})" if job else ""
        )
        _leave(f"{who}: not writing ({what}) into {_FENCE['folder']}: {reason}; exiting", EXIT_FENCED)


def _leave(line: str, status: int) -> None:
    try:
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
    finally:
        os._exit(status)


# reservation at submission ---------------------------------------------------------------------------
def _reservation(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RESERVATION_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _job_alive(record: dict[str, Any]) -> bool | None:
    """Whether the reserving job (or its submission, before the job id is known) is still pending or
    running; None when that cannot be found out (squeue cannot be asked)."""
    job, cluster = record.get("job_id"), record.get("cluster")
    if job is None:  # submitting: alive while the submitting process is
        if record.get("host") == socket.gethostname():
            return _process_start(int(record.get("pid") or 0)) is not None
        return time.time() - float(record.get("time") or 0) < STALE_AFTER_S
    if cluster == "slurm":
        return _slurm_job_active(str(job))
    if cluster == "local" and record.get("host") == socket.gethostname():
        return str(job).isdigit() and _process_start(int(job)) is not None
    return False  # a debug job runs inside its submission, which is over


def _reserved_by(record: dict[str, Any]) -> str:
    job = f"job {record['job_id']}" if record.get("job_id") else "a job being submitted"
    return (
        f"{job} ({record.get('cluster')}), submitted from {record.get('host')} at {record.get('submitted')}"
    )


class Reservation:
    """``OUT/run.reserved`` of one submission: made by `reserve`, the job id added by `set_job`."""

    def __init__(self, folder: Path, record: dict[str, Any], took_over: str | None):
        self.path, self.record, self.took_over = folder / RESERVATION_NAME, record, took_over

    def set_job(self, job_id: str) -> None:
        from autosam2.atomic import atomic_write_text

        self.record["job_id"] = job_id
        atomic_write_text(self.path, json.dumps(self.record))

    def cancel(self) -> None:
        """Nothing was submitted: the reservation goes, if it is still ours."""
        if _token_of(self.path) == self.record["token"]:
            self.path.unlink(missing_ok=True)


def reserve(folder: str | Path, cluster: str) -> Reservation:
    """Reserve `folder` for the job about to be submitted; OutputDirInUse naming the job that holds it
    while that job is pending or running. A reservation whose job has ended is taken over."""
    folder = Path(folder)
    record = {
        "token": uuid.uuid4().hex,
        "job_id": None,
        "cluster": cluster,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    took_over = None
    for _ in range(10):
        try:
            fd = os.open(folder / RESERVATION_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = _reservation(folder)
            if found is None:
                continue
            if found and _job_alive(found) is not False:
                raise OutputDirInUse(_reserved_message(folder, found)) from None
            aside = folder / f".{RESERVATION_NAME}.stale-{record['token']}"
            try:
                os.rename(folder / RESERVATION_NAME, aside)
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            took_over = f"{folder}: took over the reservation of {_reserved_by(found)}: it has ended"
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return Reservation(folder, record, took_over)
    raise OutputDirInUse(f"{folder / RESERVATION_NAME}: could not reserve (other submissions keep taking it)")


def _reserved_message(folder: Path, found: dict[str, Any]) -> str:
    alive = _job_alive(found)
    state = "pending or running" if alive else "its state unknown: squeue could not be asked"
    return (
        f"{folder}: reserved by {_reserved_by(found)}, {state}; wait for it, cancel it, or choose another "
        f"output directory ({folder / RESERVATION_NAME})"
    )


def check_reserved(folder: str | Path) -> None:
    """OutputDirInUse when a submission's job, pending or running, reserved `folder` (for launchers)."""
    found = _reservation(Path(folder))
    if found and _job_alive(found) is not False:
        raise OutputDirInUse(_reserved_message(Path(folder), found))


def check_reserved_for_me(folder: Path) -> None:
    """A run starting in `folder`: OutputDirInUse when another submission's job, pending or running,
    reserved it (ours: the token in `RESERVATION_VARIABLE`, or the same SLURM job after a requeue)."""
    found = _reservation(folder)
    if not found:
        return
    mine = os.environ.get(RESERVATION_VARIABLE)
    job = os.environ.get("SLURM_JOB_ID")
    if (mine and found.get("token") == mine) or (job and str(found.get("job_id")) == job):
        return
    if _job_alive(found) is not False:
        raise OutputDirInUse(_reserved_message(folder, found))


def drop_reservation(folder: Path) -> None:
    """Remove `folder`'s reservation if it is this job's (`RESERVATION_VARIABLE`)."""
    mine = os.environ.get(RESERVATION_VARIABLE)
    found = _reservation(folder)
    if mine and found and found.get("token") == mine:
        (folder / RESERVATION_NAME).unlink(missing_ok=True)
