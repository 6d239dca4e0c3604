"""The small collectives the loop uses; each is the identity without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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
