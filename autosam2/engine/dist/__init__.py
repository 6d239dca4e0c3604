"""Distributed set-up from torchrun's or SLURM's variables: one process per GPU (or CPU rank), gloo or NCCL.

One module per job: `slurm` (the one mapping of SLURM's variables to torch's, and the job's port),
`settings` (the thread rule, per-rank seeds, cuDNN/TF32), `group` (the process group's life),
`watchdog` (the watch on torchrun), `peers` (the ranks' hosts and the error store) and `collectives`.
Callers import the names below from this package.
"""

from autosam2.engine.dist.collectives import all_reduce, barrier, broadcast_object, gather_objects
from autosam2.engine.dist.group import (
    DistInfo,
    cleanup,
    distributed,
    init_distributed,
    pick_device,
    single_process_group,
)
from autosam2.engine.dist.peers import announce_ranks, host_address, peer_lost, rank_hosts, timed_out
from autosam2.engine.dist.settings import (
    configure_backends,
    configure_threads,
    seed_everything,
    torch_threads,
)
from autosam2.engine.dist.slurm import job_port, map_slurm_env
from autosam2.engine.dist.watchdog import LAUNCHER_GRACE_S, stop_when_launcher_gone, watch_launcher

__all__ = [
    "LAUNCHER_GRACE_S",
    "DistInfo",
    "all_reduce",
    "announce_ranks",
    "barrier",
    "broadcast_object",
    "cleanup",
    "configure_backends",
    "configure_threads",
    "distributed",
    "gather_objects",
    "host_address",
    "init_distributed",
    "job_port",
    "map_slurm_env",
    "peer_lost",
    "pick_device",
    "rank_hosts",
    "seed_everything",
    "single_process_group",
    "stop_when_launcher_gone",
    "timed_out",
    "torch_threads",
    "watch_launcher",
]
