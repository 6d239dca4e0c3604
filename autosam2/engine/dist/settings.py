"""Per-process torch settings of a rank: the one CPU thread rule, per-rank seeds, cuDNN and TF32."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


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
