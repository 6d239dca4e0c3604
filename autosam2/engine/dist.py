"""Distributed set-up from torchrun's or SLURM's variables: one process per GPU (or CPU rank), gloo or NCCL.

The one mapping of SLURM's variables to torch's lives here (`map_slurm_env`), as do per-rank seeding, the
process group's life (`distributed`), the watch on torchrun, and the small collectives the loop uses.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from autosam2.config import ConfigError
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
    # a port derived from the job id: stable for every task of the job, distinct between jobs
    env.setdefault("MASTER_PORT", str(20000 + int(job or "0") % 20000))


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


def torch_threads(requested: int | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(torch CPU threads for this rank, where the number came from), one rule for every launcher, so the
    same config gives the same numbers alone, under torchrun, srun or the launcher (CPU reductions
    depend on the thread count): `requested` (``train.threads``); else SLURM's ``SLURM_CPUS_PER_TASK``
    (shared by the ranks of a torchrun inside the task); else ``OMP_NUM_THREADS`` (torchrun sets 1 for
    several ranks); else this process's cores over the ranks of its host."""
    env = os.environ if env is None else env
    local_ranks = max(1, int(env.get("LOCAL_WORLD_SIZE") or "1"))
    if requested is not None:
        return requested, "train.threads"
    if env.get("SLURM_CPUS_PER_TASK"):
        cpus = int(env["SLURM_CPUS_PER_TASK"])
        if env.get("TORCHELASTIC_RUN_ID"):  # torchrun's ranks share the task's CPUs
            return max(
                1, cpus // local_ranks
            ), f"SLURM_CPUS_PER_TASK={cpus} over {local_ranks} torchrun ranks"
        return max(1, cpus), f"SLURM_CPUS_PER_TASK={cpus}"
    if env.get("OMP_NUM_THREADS"):
        return max(1, int(env["OMP_NUM_THREADS"])), f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // local_ranks), f"{cores} cores over {local_ranks} rank(s) of this host"


def configure_threads(requested: int | None = None) -> tuple[int, str]:
    """`torch_threads`, applied to torch (intra-op threads); the count torch then reports."""
    threads, source = torch_threads(requested)
    torch.set_num_threads(threads)
    return torch.get_num_threads(), source


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # the same on every rank: random init must agree before DDP broadcasts


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


class StopRequest(Protocol):
    def request(self) -> None: ...


LAUNCHER_GRACE_S = 300.0  # a rank whose torchrun is gone checkpoints at the next step, or dies after this


def stop_when_launcher_gone(stop: StopRequest, rank: int) -> bool:
    """Under torchrun, ask `stop` (the loop's StopSignal) for a checkpoint at the next step once torchrun is gone,
    and exit the process `LAUNCHER_GRACE_S` later if the loop has not ended by then."""

    def gone(pid: int) -> None:
        print(
            f"rank {rank}: its launcher (pid {pid}) is gone: stopping at the next step with a checkpoint "
            f"(or exiting in {LAUNCHER_GRACE_S:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        stop.request()
        deadline = threading.Timer(LAUNCHER_GRACE_S, os._exit, args=(1,))
        deadline.daemon = True
        deadline.start()

    return watch_launcher(gone)


def pick_device(request: str, local_rank: int) -> torch.device:
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {request} asked for, but no CUDA device is visible; use --cpu")
    if request in ("auto", "cuda"):
        return torch.device("cuda", local_rank)
    return torch.device(request)


def configure_backends(cudnn_benchmark: bool, tf32: bool) -> dict[str, str]:
    """cuDNN's autotuner, and TF32 for the fp32 matrix products and convolutions of CUDA devices, as the
    config states (CPU arithmetic and bf16 autocast do not depend on them); the settings, for the log."""
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    return {
        "cudnn_benchmark": str(cudnn_benchmark),
        "cuda_matmul_fp32": precision,
        "cudnn_conv_fp32": precision,
    }


def init_distributed(device_request: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Read the launcher's variables, pick the device, and join the process group when there are ranks."""
    map_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        _join_group(device, timeout_s)
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
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(device_request: str = "auto", timeout_s: int = 600) -> Iterator[DistInfo]:
    """The process group for the block, torn down after it however it ends. A collective that fails
    because another rank went away, or gave no answer within `timeout_s`, becomes one RankLost line
    (that rank's own error says why)."""
    info = init_distributed(device_request, timeout_s)
    try:
        yield info
    except BaseException as err:
        if info.world_size > 1 and isinstance(err, RuntimeError) and peer_lost(err):
            text = str(err).strip()
            here = text.splitlines()[0] if text else type(err).__name__
            if timed_out(err):
                raise RankLost(
                    f"rank {info.rank}: no answer from another rank within train.dist_timeout_s={timeout_s} s "
                    f"(it stopped, hangs or its host is gone), so this one stops too{_other_ranks(info.rank)} "
                    f"(here: {here})"
                ) from err
            said = _peer_errors(info)
            why = (
                f"{said}{_other_ranks(info.rank)}"
                if said
                else f"that rank's own error says why{_other_ranks(info.rank)}"
            )
            raise RankLost(
                f"rank {info.rank}: another rank stopped, so this one stops too ({why}; here: {here})"
            ) from err
        if info.world_size > 1 and not isinstance(err, RankLost):
            _tell_peers(info, err)
        raise
    finally:
        cleanup()


_ERROR_KEY = "autosam2/error/rank{}"


def _tell_peers(info: DistInfo, err: BaseException) -> None:
    """This rank's error, first line, left in the group's store before the rank goes, so the ranks that
    only see it vanish can say why (a job's first failing task is often one of those)."""
    text = str(err).strip()
    line = (text.splitlines()[0] if text else type(err).__name__)[:500]
    try:
        dist.distributed_c10d._get_default_store().set(_ERROR_KEY.format(info.rank), line)
    except Exception:  # noqa: BLE001 -- the store went with its host: the others say what they can
        pass


def _peer_errors(info: DistInfo, wait_s: float = 2.0) -> str:
    """What the ranks that stopped left in the store (`_tell_peers`), e.g. ``rank 1: <its error>``."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return ""
    keys = {r: _ERROR_KEY.format(r) for r in range(info.world_size) if r != info.rank}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found = {r: store.get(k).decode(errors="replace") for r, k in keys.items() if store.check([k])}
        except Exception:  # noqa: BLE001 -- the store's host is the rank that went
            return ""
        if found or time.monotonic() > deadline:
            return "; ".join(f"rank {r}: {line}" for r, line in sorted(found.items()))
        time.sleep(0.1)


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


def peer_lost(err: RuntimeError) -> bool:
    """A collective that failed because another rank went away (gloo closes its connections) or gave
    no answer within the process group's timeout."""
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(err, dist.DistError) or timed_out(err) or any(sign in str(err) for sign in signs)


def timed_out(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def host_address() -> str:
    """The address this host reaches the rendezvous host by (the interface the process group's traffic
    leaves from): 127.0.0.1 on one host, the host's own network address across hosts."""
    target = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # UDP: routes, sends nothing
            probe.connect((target, int(os.environ.get("MASTER_PORT", "29500"))))
            return probe.getsockname()[0]
    except OSError:
        return "unknown"


_RANK_HOSTS: list[tuple[str, str]] = []  # what rank_hosts gathered: a lost rank's error names its host


def rank_hosts() -> list[tuple[str, str]]:
    """(hostname, address) of every rank, in rank order, on every rank."""
    _RANK_HOSTS[:] = gather_objects((socket.gethostname(), host_address()))
    return list(_RANK_HOSTS)


def announce_ranks(info: DistInfo) -> list[tuple[str, str]]:
    """`rank_hosts`, and rank 0 prints them on one line: ``ranks: 0 node1 10.0.0.1, 1 node2 ...``."""
    hosts = rank_hosts()
    if info.is_main:
        print("ranks: " + ", ".join(f"{r} {name} {addr}" for r, (name, addr) in enumerate(hosts)), flush=True)
    return hosts


def _other_ranks(rank: int) -> str:
    hosts = [f"{r} on {name} ({address})" for r, (name, address) in enumerate(_RANK_HOSTS) if r != rank]
    return f"; the other ranks: {', '.join(hosts)}" if hosts else ""


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
