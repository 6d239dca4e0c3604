"""Gradient communication: the bytes each rank hands its collectives during a training step's backward
and optimizer step, with train.grad_compression=none and =bf16, and how far apart the weights end after
the same steps from the same start.

`--ranks` processes on this host (gloo on the CPU, NCCL on GPUs, one GPU each) run the config's engine
through the trainer's own `train_step`, each rank on its own synthetic clips, once per setting. The
bytes are counted in the process, at the collectives themselves (torch.distributed under DDP, DeepSpeed's
communication backend under DeepSpeed): the payload of each call, its full tensor (an all-reduce's
buffer, a reduce-scatter's input, an all-gather's output). The ring algorithms put 2 (n-1)/n of that on
each rank's link, the same factor for both settings, so the ratio is the link's. Under DDP the fp32
setting registers torch's plain all-reduce hook, which torch documents as DDP's own reduction, so that
its calls are seen too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autosam2.arguments import add_device, positive_int
from autosam2.bench.common import default_device, run_config, sync, synthetic_clip
from autosam2.config import Config, ConfigError, EngineKind, GradCompression, load_config
from autosam2.data.batches import TrainingBatches
from autosam2.engine.checkpoint import Checkpointer
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import DDPEngine, build_engine
from autosam2.engine.stop import StopSignal
from autosam2.engine.trainer import Trainer
from autosam2.model.sam2_builder import build_autosam2
from autosam2.model.weights import trainable_state
from autosam2.tracking import NullLogger

# without --config: the CPU demo's model (trainable mask decoder and prompt encoder), small and fast
SMALL = ["model.image_size=64", "data.clip_len=1", "data.feature_cache=none", "train.device=cpu"]
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather")
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter_tensor")  # what carries gradients
# bf16 first: on the development machine the steps of a process's first DDP engine with the plain
# all-reduce hook took 14-28 s against 0.3 s after it (cause not found); in this order both time alike
ORDER = (GradCompression.bf16, GradCompression.none)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="run config (default: cpu_demo at 64 px, one frame)"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--ranks", type=positive_int, default=2, help="processes on this host (default 2)")
    p.add_argument("--steps", type=positive_int, default=2, help="training steps per setting (default 2)")
    add_device(p, default_device(), device_alias=True)


def _payload(args: tuple, kwargs: dict) -> int:
    """The bytes of a collective's largest tensor argument (lists of tensors summed)."""
    sizes = [0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            sizes.append(value.numel() * value.element_size())
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            sizes.append(sum(t.numel() * t.element_size() for t in value))
    return max(sizes)


class Counter:
    """Bytes handed to a target's collectives (a module, or DeepSpeed's backend), by collective, while
    `inside` wraps the call being measured."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.on = False

    def inside(self, call: Callable) -> Callable:
        def measured(*args: Any) -> Any:
            self.on = True
            try:
                return call(*args)
            finally:
                self.on = False

        return measured

    @contextmanager
    def watching(self, target: Any) -> Iterator[None]:
        """`target`'s collectives counted within the block; the originals are put back after it."""
        saved = {name: getattr(target, name) for name in COLLECTIVES if hasattr(target, name)}

        def wrap(name: str, call: Callable) -> Callable:
            def counted(*args: Any, **kwargs: Any) -> Any:
                if self.on:
                    self.counts[name] += _payload(args, kwargs)
                return call(*args, **kwargs)

            return counted

        for name, call in saved.items():
            setattr(target, name, wrap(name, call))
        try:
            yield
        finally:
            for name, call in saved.items():
                setattr(target, name, call)


def _collectives(cfg: Config) -> Any:
    """Where the engine's collectives go through."""
    if cfg.train.engine == EngineKind.deepspeed:
        import deepspeed.comm.comm

        return deepspeed.comm.comm.cdb
    return dist


def _train(cfg: Config, info: DistInfo, steps: int, output: Path) -> dict[str, Any]:
    """`steps` of the config from seed 0: bytes of the engine's backward and step by collective, step
    seconds, the trained weights."""
    torch.manual_seed(0)
    model = build_autosam2(cfg.model, info.device).train()
    engine = build_engine(model, cfg, steps, info)
    if isinstance(engine, DDPEngine) and cfg.train.grad_compression == GradCompression.none:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        engine.wrapped.register_comm_hook(None, allreduce_hook)
    no_data = TrainingBatches(lambda epoch: [], 0)
    trainer = Trainer(
        cfg, engine, no_data, steps, Checkpointer(output, info), NullLogger(), info, stop=StopSignal(())
    )
    counter = Counter()
    engine.backward, engine.step = counter.inside(engine.backward), counter.inside(engine.step)
    initial = {k: v.detach().float().cpu().clone() for k, v in trainable_state(model).items()}
    torch.manual_seed(1 + info.rank)  # each rank its own clips, the same under both settings
    seconds = []
    with counter.watching(_collectives(cfg)):
        for _ in range(steps):
            clip = synthetic_clip(cfg.data.clip_len, cfg.data.batch_size, cfg.model.image_size)
            start = time.perf_counter()
            trainer.train_step(clip)
            sync(info.device)
            seconds.append(time.perf_counter() - start)
    weights = {k: v.detach().float().cpu().clone() for k, v in trainable_state(model).items()}
    hook = getattr(engine, "wrapped", None)
    hooked = hook._get_ddp_logging_data().get("comm_hook") if hasattr(hook, "_get_ddp_logging_data") else None
    return {
        "counts": dict(counter.counts),
        "seconds": seconds,
        "initial": initial,
        "weights": weights,
        "comm_hook": hooked,
    }


def _rank(rank: int, ranks: int, port: int, job: dict[str, Any], folder: Path) -> None:
    """One rank (on the GPU of its number, or the CPU): joins the group through the parent's store and
    trains once per setting; rank 0 saves what both did."""
    from autosam2.engine.dist.group import _join_group, cleanup

    # stdout carries the parent's figures alone: what a rank prints (DeepSpeed's builds) goes to stderr
    os.dup2(2, 1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank))  # DeepSpeed reads them
    device = torch.device(job["device"] if job["device"] == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    _join_group(device, 600, store=store, rank=rank, world_size=ranks)
    try:
        info = DistInfo(rank, ranks, rank, device)
        results = {}
        for mode in ORDER:
            cfg = load_config(job["config"], [*job["overrides"], f"train.grad_compression={mode}"])
            results[str(mode)] = _train(cfg, info, job["steps"], folder / str(mode))
        if info.is_main:
            torch.save(results, folder / "results.pt")
    finally:
        cleanup()


def _median_after_first(seconds: list[float]) -> float:
    return round(statistics.median(seconds[1:] or seconds), 4)


def _check_ranks(ranks: int, device: str) -> None:
    """One process per rank, each on its own GPU or sharing the CPU's cores: more ranks than the host
    has of those is refused before any starts."""
    if device == "cpu":
        have, what = len(os.sched_getaffinity(0)), "cores this process may run on"
    else:
        have, what = torch.cuda.device_count(), "GPUs (one per rank)"
    if ranks > have:
        raise ConfigError(f"--ranks {ranks}: this host has {have} {what}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_ranks(args.ranks, args.device)
    config = args.config or "cpu_demo"
    overrides = [*([] if args.config else SMALL), *args.overrides]
    cfg = load_config(config, overrides)  # a bad config or override is one line here, before any rank
    job = {"config": config, "overrides": overrides, "steps": args.steps, "device": args.device}
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the OS picks
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-comm-") as tmp:
        torch.multiprocessing.start_processes(
            _rank, args=(args.ranks, store.port, job, Path(tmp)), nprocs=args.ranks, start_method="spawn"
        )
        results = torch.load(Path(tmp) / "results.pt", weights_only=False)
    none, bf16 = results[str(GradCompression.none)], results[str(GradCompression.bf16)]
    sent = {
        mode: sum(r["counts"].get(op, 0) for op in REDUCTIONS) / args.steps for mode, r in results.items()
    }
    keys = list(none["weights"])
    difference = max((none["weights"][k] - bf16["weights"][k]).abs().max().item() for k in keys)
    update = max((none["weights"][k] - none["initial"][k]).abs().max().item() for k in keys)
    apart = torch.cat([(none["weights"][k] - bf16["weights"][k]).flatten() for k in keys]).norm().item()
    moved = torch.cat([(none["weights"][k] - none["initial"][k]).flatten() for k in keys]).norm().item()
    return {
        "bench": "comm",
        "gradient_bytes_per_step": {mode: int(n) for mode, n in sent.items()},
        "ratio": round(sent["bf16"] / sent["none"], 4) if sent["none"] else None,
        "bytes_per_step_by_collective": {
            mode: {op: int(n / args.steps) for op, n in r["counts"].items()} for mode, r in results.items()
        },
        "weights": {
            "max_abs_difference": difference,
            "max_abs_update": update,
            "update_difference_norm_ratio": round(apart / moved, 6) if moved else None,
        },
        "step_seconds": {mode: _median_after_first(r["seconds"]) for mode, r in results.items()},
        "step_seconds_each": {mode: [round(t, 4) for t in r["seconds"]] for mode, r in results.items()},
        "comm_hook": {mode: r["comm_hook"] for mode, r in results.items()},
        "trainable_parameters": sum(v.numel() for v in none["weights"].values()),
        "config": {
            **run_config(Path(config) if args.config else None, cfg),
            "engine": str(cfg.train.engine),
            "ranks": args.ranks,
            "device": args.device,
            "steps": args.steps,
        },
        "notes": "bytes: the payload the engine's backward and optimizer step hand the collectives per step "
        "and rank (reductions: all_reduce, reduce, reduce_scatter), counted in the process; weights: the "
        "trainable ones after the same steps from the same start, fp32 vs bf16 communication; step_seconds: "
        "median over steps after the first",
    }
