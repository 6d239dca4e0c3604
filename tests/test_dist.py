"""The one mapping of a job step's variables to torch.distributed's."""

from __future__ import annotations

from autosam2.engine.dist import map_slurm_env


def test_slurm_variables_become_torchrun_variables():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert env["LOCAL_WORLD_SIZE"] == "4"  # SLURM_NNODES unset: one node
    assert env["MASTER_PORT"] == str(20000 + 1234) and env["MASTER_ADDR"] in ("gpu07", "gpu")
    torchrun = {"RANK": "0", "SLURM_PROCID": "5"}
    map_slurm_env(torchrun)
    assert torchrun == {"RANK": "0", "SLURM_PROCID": "5"}  # torchrun's own variables win


def test_submitit_local_tasks_become_torchrun_variables():
    # `python -m launch --cluster local`: the tasks are processes of this host
    env = {
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_JOB_ID": "4321",
    }
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "1",
        "2",
        "1",
        "2",
    )
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(20000 + 4321))
    alone = {"PATH": "/bin"}
    map_slurm_env(alone)
    assert alone == {"PATH": "/bin"}  # neither a job step nor torchrun: nothing to map
