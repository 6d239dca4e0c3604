"""Distributed set-up from torchrun's or SLURM's variables: one process per GPU (or CPU rank), gloo or NCCL.

One module per job: `slurm` (the one mapping of SLURM's variables to torch's, and the job's port),
`settings` (the thread rule, per-rank seeds, cuDNN/TF32), `group` (the process group's life),
`watchdog` (the watch on torchrun), `peers` (the ranks' hosts and the error store) and `collectives`.
Callers import the names below from this package; each is loaded from its module when first asked for
(PEP 562), so `python -m autosam2.engine.dist` (the job scripts' port and requeue cap, asked before srun
starts the ranks) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {  # name: its module in this package
    **dict.fromkeys(("all_reduce", "barrier", "broadcast_object", "gather_objects"), "collectives"),
    **dict.fromkeys(
        ("DistInfo", "cleanup", "distributed", "init_distributed", "pick_device", "single_process_group"),
        "group",
    ),
    **dict.fromkeys(("announce_ranks", "host_address", "peer_lost", "rank_hosts", "timed_out"), "peers"),
    **dict.fromkeys(("configure_backends", "configure_threads", "seed_everything", "torch_threads"), "settings"),
    **dict.fromkeys(("job_port", "map_slurm_env"), "slurm"),
    **dict.fromkeys(("LAUNCHER_GRACE_S", "stop_when_launcher_gone", "watch_launcher"), "watchdog"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
