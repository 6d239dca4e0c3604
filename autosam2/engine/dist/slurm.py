"""A job step's variables (SLURM's under srun, submitit's local executor's) mapped to torchrun's, and the
two rules a training job keeps however it was submitted:
- its one rendezvous port: `map_slurm_env` sets it as MASTER_PORT under srun (`python -m launch`, srun by
  hand), and `launch/train.sbatch` reads it (`python -m autosam2.engine.dist port JOB_ID`) for torchrun;
- its requeue cap: the default of `python -m launch --max-requeues` (submitit's count of time-outs), and
  what `launch/train.sbatch` compares SLURM_RESTART_COUNT with before it requeues itself
  (`python -m autosam2.engine.dist max-requeues`);
- its requeues after a rank died (`requeue_after_failure`): what the launcher's job script (--max-failures)
  and `launch/train.sbatch` (AUTOSAM2_MAX_FAILURES) run once srun has ended
  (`python -m autosam2.engine.dist after-srun`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PORT_BASE = 20000  # job ports fall in [PORT_BASE, 2 * PORT_BASE)
MAX_REQUEUES = 3  # times a training job requeues itself at its time limit before it stops for good


def rank_failed(status: int) -> bool:
    """Whether srun's (or torchrun's) exit status says a rank died (a crash, the OOM killer's SIGKILL): not
    0, not a run stopped by a signal with its checkpoint (EXIT_STOPPED), not the job ended by SLURM's
    SIGTERM or a Ctrl-C."""
    from autosam2.engine.stop import EXIT_STOPPED

    return status not in (0, EXIT_STOPPED, 128 + signal.SIGTERM, 128 + signal.SIGINT)


def requeue_after_failure(status: int, max_failures: int, count_file: Path, job_id: str) -> bool:
    """Once srun has ended with `status`: when a rank died, requeue job `job_id` if it has been requeued
    after a failure fewer than `max_failures` times (the count kept in `count_file`), saying so in one
    line, or say in one line why not. True when the job was requeued; it resumes from its last
    checkpoint (train.resume=auto)."""
    if not rank_failed(status):
        return False
    from autosam2.atomic import atomic_write_text

    head = f"autosam2: job {job_id}: a rank failed (srun's exit status {status})"
    try:
        text = count_file.read_text().strip() if count_file.exists() else "0"
        count = int(text) if text.isdigit() else 0
        if count < max_failures:
            atomic_write_text(count_file, f"{count + 1}\n")
    except OSError as err:
        print(f"{head}; not requeueing it: {count_file}: {err.strerror or err}", file=sys.stderr, flush=True)
        return False
    if count >= max_failures:
        print(
            f"{head}; not requeueing it: it was requeued after a failure {count} time(s), the cap is "
            f"{max_failures} (--max-failures / AUTOSAM2_MAX_FAILURES)",
            file=sys.stderr,
            flush=True,
        )
        return False
    print(
        f"{head}; requeueing it ({count + 1} of {max_failures}): it resumes from its last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"autosam2: job {job_id}: requeue failed: {err}", file=sys.stderr, flush=True)
        return False
    return True


def job_port(job_id: int | str) -> int:
    """The rendezvous port of a job: the same for every task of the job, distinct between jobs."""
    return PORT_BASE + int(job_id) % PORT_BASE


# the task variables of a job step: SLURM's (under srun), and those of submitit's local executor
# (`python -m launch --cluster local`), whose tasks are processes of this host
_TASKS = {
    "SLURM_PROCID": ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NNODES", "SLURM_JOB_ID"),
    "SUBMITIT_LOCAL_GLOBALID": (
        "SUBMITIT_LOCAL_NTASKS",
        "SUBMITIT_LOCAL_LOCALID",
        "SUBMITIT_LOCAL_JOB_NUM_NODES",
        "SUBMITIT_LOCAL_JOB_ID",
    ),
}


def map_slurm_env(env: dict[str, str] | None = None) -> None:
    """Under `srun` (no torchrun), export RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_* from
    SLURM's variables (or from submitit's local executor's); torchrun's own variables win.

    torch.distributed, DeepSpeed and webdataset read the torchrun names only.
    """
    env = os.environ if env is None else env
    found = next((rank for rank in _TASKS if rank in env), None)
    if "RANK" in env or found is None:
        return
    size, local, nodes, job = (env.get(name, "") for name in _TASKS[found])
    env["RANK"] = env[found]
    env["WORLD_SIZE"] = size or "1"
    env["LOCAL_RANK"] = local or "0"
    env["LOCAL_WORLD_SIZE"] = str(max(1, int(env["WORLD_SIZE"]) // max(1, int(nodes or "1"))))
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env["MASTER_ADDR"] = _first_host(nodelist) if found == "SLURM_PROCID" and nodelist else "127.0.0.1"
    env.setdefault("MASTER_PORT", str(job_port(job or "0")))


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]
