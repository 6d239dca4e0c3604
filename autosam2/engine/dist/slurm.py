"""A job step's variables (SLURM's under srun, submitit's local executor's) mapped to torchrun's, and the
two rules a training job keeps however it was submitted:
- its one rendezvous port: `map_slurm_env` sets it as MASTER_PORT under srun (`python -m launch`, srun by
  hand), and `launch/train.sbatch` reads it (`python -m autosam2.engine.dist port JOB_ID`) for torchrun;
- its requeue cap: the default of `python -m launch --max-requeues` (submitit's count of time-outs), and
  what `launch/train.sbatch` compares SLURM_RESTART_COUNT with before it requeues itself
  (`python -m autosam2.engine.dist max-requeues`)."""

from __future__ import annotations

import os
import subprocess

PORT_BASE = 20000  # job ports fall in [PORT_BASE, 2 * PORT_BASE)
MAX_REQUEUES = 3  # times a training job requeues itself at its time limit before it stops for good


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
