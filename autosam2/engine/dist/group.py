"""The process group's life: the device of a rank, joining the group (gloo on the CPU, NCCL on a GPU),
a group of one for benchmarks, and the teardown that turns a lost peer into one RankLost line."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autosam2.config import ConfigError
from autosam2.engine.dist.peers import other_ranks, peer_errors, peer_lost, tell_peers, timed_out
from autosam2.engine.dist.slurm import map_slurm_env
from autosam2.engine.dist.watchdog import PEER_TIMEOUT_S, PeerWatch
from autosam2.errors import RankLost


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(request: str, local_rank: int) -> torch.device:
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {request} asked for, but no CUDA device is visible; use --cpu")
    if request in ("auto", "cuda"):
        return torch.device("cuda", local_rank)
    return torch.device(request)


_WATCH: list[PeerWatch] = []  # the watch on the peers of this process's group, while it is joined


def init_distributed(
    device_request: str = "auto", timeout_s: int = 600, peer_timeout_s: float = PEER_TIMEOUT_S
) -> DistInfo:
    """Read the launcher's variables, pick the device, and join the process group when there are ranks;
    the peers are watched from then on (`PeerWatch`, bound `peer_timeout_s`) until `cleanup`."""
    map_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        _join_group(device, timeout_s)
        address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
        _WATCH.append(PeerWatch(rank, world_size, peer_timeout_s, address).start())
    return DistInfo(rank, world_size, local_rank, device)


def _join_group(device: torch.device, timeout_s: int, **kwargs: Any) -> None:
    """init_process_group, gloo on CPU and NCCL on GPU, with `timeout_s` on every collective. For NCCL,
    its watchdog tears the process down when a collective times out or fails (async error handling), so
    a rank waiting on a dead peer does not hang in a CUDA call past the timeout."""
    kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kwargs["device_id"] = device  # eager NCCL set-up: a bad GPU or network fails here, not mid-step
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)


def cleanup() -> None:
    while _WATCH:
        _WATCH.pop().stop()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(
    device_request: str = "auto", timeout_s: int = 600, peer_timeout_s: float = PEER_TIMEOUT_S
) -> Iterator[DistInfo]:
    """The process group for the block, torn down after it however it ends. A collective that fails
    because another rank went away, or gave no answer within `timeout_s`, becomes one RankLost line
    (that rank's own error says why); a peer silent for `peer_timeout_s` (stopped, or its host
    unreachable) ends this process with one line (`PeerWatch`)."""
    info = init_distributed(device_request, timeout_s, peer_timeout_s)
    try:
        yield info
    except BaseException as err:
        if info.world_size > 1 and isinstance(err, RuntimeError) and peer_lost(err):
            text = str(err).strip()
            here = text.splitlines()[0] if text else type(err).__name__
            if timed_out(err):
                raise RankLost(
                    f"rank {info.rank}: no answer from another rank within train.dist_timeout_s={timeout_s} s "
                    f"(it stopped, hangs or its host is gone), so this one stops too{other_ranks(info.rank)} "
                    f"(here: {here})"
                ) from err
            said = peer_errors(info)
            why = (
                f"{said}{other_ranks(info.rank)}"
                if said
                else f"that rank's own error says why{other_ranks(info.rank)}"
            )
            raise RankLost(
                f"rank {info.rank}: another rank stopped, so this one stops too ({why}; here: {here})"
            ) from err
        if info.world_size > 1 and not isinstance(err, RankLost):
            tell_peers(info, err)
        raise
    finally:
        cleanup()


@contextmanager
def single_process_group(device: torch.device, timeout_s: int = 600) -> Iterator[DistInfo]:
    """A process group of this process alone (NCCL on a GPU, gloo on the CPU) on a free loopback port,
    so DDP's reducer and DeepSpeed run as in a job: for benchmarks and device checks."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)  # port 0: the OS picks one
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # DeepSpeed reads these
    try:
        if device.type == "cuda":
            device = torch.device(
                "cuda", torch.cuda.current_device() if device.index is None else device.index
            )
            torch.cuda.set_device(device)  # DDP and NCCL want the GPU's index
        _join_group(device, timeout_s, store=store, rank=0, world_size=1)
        yield DistInfo(0, 1, 0, device)
    finally:
        cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
