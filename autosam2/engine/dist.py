"""Distributed set-up from torchrun's or SLURM's variables: one process per GPU (or CPU rank), gloo or NCCL."""

from __future__ import annotations

import datetime
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def map_slurm_env(env: dict[str, str] | None = None) -> None:
    """Under `srun` (no torchrun), export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from SLURM's variables.

    torch.distributed, DeepSpeed and webdataset read the torchrun names only.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_host(
            env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
        )
    # a port derived from the job id: stable for every task of the job, distinct between jobs
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


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


def watch_launcher(on_gone: Callable[[int], None], poll_s: float = 1.0) -> bool:
    """Under torchrun, call `on_gone(pid)` once when torchrun, our parent, is gone (killed with -9,
    say): ranks must not train on unsupervised. Returns whether a watch was started."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False  # alone, the parent is a shell that may exit on purpose (nohup); srun's stays
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        on_gone(parent)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return True


def pick_device(request: str, local_rank: int) -> torch.device:
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"train.device={request} but no CUDA device is visible; use --cpu")
    if request in ("auto", "cuda"):
        return torch.device("cuda", local_rank)
    return torch.device(request)


def init_distributed(device_request: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Read the launcher's variables, pick the device, and join the process group when there are ranks."""
    map_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(value: float, op: str = "sum") -> float:
    """A float reduced over ranks (sum or max); the value itself without a process group."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(tensor.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, on every rank (small things: per-sequence metrics, counters)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
