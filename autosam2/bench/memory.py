"""Memory of a run config's training steps: peak tensor bytes by kind, and a per-GPU estimate.

The config's model, image size, clip and precision run for real through the trainer's own `train_step`
(random weights, a synthetic clip; fp32 weights under bf16 autocast, as both engines train). The bytes
the steps allocate are counted while they live by torch's own accounting: the profiler's allocator
record on the CPU (every allocation, op workspaces included), the caching allocator's peak on a GPU.
DDP adds its gradient buckets; DeepSpeed's ZeRO partitions (Adam states, reduced gradients, the reduce
bucket) replace the full Adam states, by formula, divided over ``--ranks`` as its stage says.
``--compare-checkpointing`` measures the config a second time with `model.activation_checkpointing`
the other way, and reports both peaks and the ratio of their activations (with / without).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from autosam2.arguments import add_device, positive_int
from autosam2.bench.common import default_device, run_config, synthetic_clip
from autosam2.config import Config, EngineKind, Precision, load_config
from autosam2.data.batches import TrainingBatches
from autosam2.engine.checkpoint import Checkpointer
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import DDPEngine, read_deepspeed_config
from autosam2.engine.stop import StopSignal
from autosam2.engine.trainer import Trainer
from autosam2.model.sam2_builder import build_autosam2
from autosam2.tracking import NullLogger


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config (default: the embedded defaults)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument(
        "--ranks", type=positive_int, default=8, help="data-parallel ranks for ZeRO sharding (default 8)"
    )
    p.add_argument("--steps", type=positive_int, default=2, help="training steps tracked (default 2)")
    p.add_argument(
        "--compare-checkpointing",
        action="store_true",
        help="measure with and without model.activation_checkpointing, and the ratio of their activations",
    )
    add_device(p, default_device(), device_alias=True)


def peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """The peak of the bytes that `run` allocates on `device`, counted while they live (tensors made
    before it, the weights, are not counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # the profiler's record of every CPU allocation and free, replayed: only blocks allocated while it
    # ran count (its own running total also carries blocks of earlier sessions)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        run()
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    live = peak = 0
    sizes: dict[int, int] = {}
    for event in sorted(events, key=lambda e: e["ts"]):
        nbytes, address = event["args"]["Bytes"], event["args"]["Addr"]
        if nbytes > 0:
            sizes[address] = nbytes
            live += nbytes
        elif address in sizes:
            live -= sizes.pop(address)
        peak = max(peak, live)
    return peak


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(cfg: Config, device: torch.device, steps: int) -> tuple[torch.nn.Module, DDPEngine, int, int]:
    """The model, its engine, the peak bytes its training steps allocated, and attention modules whose
    dropout was zeroed."""
    torch.manual_seed(0)
    model = build_autosam2(cfg.model, device).train()
    # CUDA's fused attention kernels keep attention dropout at O(tokens) memory; CPU attention with
    # dropout falls back to materialising the attention matrix, so off the GPU it is set to 0 here
    no_dropout = [m for m in model.modules() if hasattr(m, "dropout_p")] if device.type != "cuda" else []
    for module in no_dropout:
        module.dropout_p = 0.0
    info = DistInfo(0, 1, 0, device)
    # one process with the config's precision (autocast on the CPU too, as on the GPUs it estimates)
    engine = DDPEngine(model, cfg.optim, steps, info, autocast=cfg.train.precision == Precision.bf16)
    # the trainer's own step; nothing here reads data or writes checkpoints
    no_data = TrainingBatches(lambda epoch: [], 0)
    trainer = Trainer(
        cfg,
        engine,
        no_data,
        steps,
        Checkpointer(cfg.train.output_dir, info),
        NullLogger(),
        info,
        stop=StopSignal(()),
    )
    clip = synthetic_clip(cfg.data.clip_len, cfg.data.batch_size, cfg.model.image_size)

    def run_steps() -> None:  # from the second step on, the optimizer states are held too
        for _ in range(steps):
            trainer.train_step(clip)

    return model, engine, peak_bytes(run_steps, device), len(no_dropout)


def _engine_extra(ds_config: dict | None, n_trainable: int, ranks: int) -> tuple[str, dict[str, float]]:
    """The engine's name and the bytes it holds beside the step's own: ZeRO's partitions by its stage
    (`ds_config`: DeepSpeed's config; None: DDP), or DDP's gradient buckets over several ranks."""
    extra: dict[str, float] = {}
    if ds_config is not None:
        zero = ds_config.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        extra["zero_adam_states"] = 8 * n_trainable / (ranks if stage >= 1 else 1)
        extra["zero_reduced_gradients"] = 4 * n_trainable / (ranks if stage >= 2 else 1)
        extra["zero_reduce_bucket"] = 4 * min(n_trainable, int(zero.get("reduce_bucket_size", 5e8)))
        return f"deepspeed ZeRO-{stage}", extra
    if ranks > 1:
        extra["ddp_gradient_buckets"] = 4 * n_trainable  # DDP's flat copy of the gradients
    return "ddp", extra


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    report = _report(cfg, args, device)
    if args.compare_checkpointing:
        other = dataclasses.replace(
            cfg,
            model=dataclasses.replace(
                cfg.model, activation_checkpointing=not cfg.model.activation_checkpointing
            ),
        )
        report["checkpointing"] = checkpointing_figures(report, _report(other, args, device))
    return report


def checkpointing_figures(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The peaks of two reports of one config, with and without activation checkpointing, and the
    ratio of their activations (with / without)."""
    by_setting = {}
    for report in (first, second):
        setting = "with" if report["config"]["activation_checkpointing"] else "without"
        by_setting[setting] = {
            "activations_and_temporaries_MiB": report["peak_MiB"]["activations_and_temporaries"],
            "total_MiB": report["peak_MiB"]["total"],
            "estimate_per_gpu_GiB": report["estimate_per_gpu_GiB"],
        }
    with_, without = (by_setting[k]["activations_and_temporaries_MiB"] for k in ("with", "without"))
    return {**by_setting, "activation_ratio": round(with_ / without, 3) if without else None}


def _report(cfg: Config, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The memory report of `cfg`'s training steps on `device`."""
    deepspeed = cfg.train.engine == EngineKind.deepspeed
    ds_config = read_deepspeed_config(Path(cfg.train.deepspeed_config)) if deepspeed else {}
    start = time.perf_counter()
    model, engine, counted, dropout_zeroed = _measure(cfg, device, args.steps)
    seconds = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = _nbytes(model.parameters()) + _nbytes(model.buffers())
    gradients = _nbytes(trainable)
    states = [v for s in engine.optimizer.state.values() for v in s.values()]
    adam_states = _nbytes(v for v in states if isinstance(v, torch.Tensor) and v.device == device)
    n_trainable = sum(p.numel() for p in trainable)
    ranks = max(1, args.ranks)
    peak = weights + counted
    optimizer_states = adam_states
    if deepspeed:
        # ZeRO holds its own (partitioned) Adam states instead: they are live through the last step,
        # where the peak is, so the full ones come off it
        peak -= adam_states
        optimizer_states = 0
    engine_name, extra = _engine_extra(ds_config if deepspeed else None, n_trainable, ranks)
    mib = 2**20
    return {
        "bench": "memory",
        "peak_MiB": {
            "weights": round(weights / mib, 1),
            "optimizer_states": round(optimizer_states / mib, 1),
            "gradients": round(gradients / mib, 1),
            "activations_and_temporaries": round((peak - weights - optimizer_states - gradients) / mib, 1),
            "total": round(peak / mib, 1),
        },
        "engine_extra_MiB": {k: round(v / mib, 1) for k, v in extra.items()},
        "estimate_per_gpu_GiB": round((peak + sum(extra.values())) / 2**30, 2),
        "parameters": {
            "trainable": n_trainable,
            "frozen": sum(p.numel() for p in model.parameters()) - n_trainable,
        },
        "config": {
            **run_config(args.config, cfg),
            "engine": engine_name,
            "ranks": ranks,
            "device": str(device),
            "steps": args.steps,
            "seconds": round(seconds, 1),
            "attention_dropout_zeroed": dropout_zeroed,
            "activation_checkpointing": cfg.model.activation_checkpointing,
        },
        "notes": "bytes allocated by the steps and live at their peak, counted on the device given (autocast's "
        "op list on CPU differs slightly from CUDA's; CPU convolutions allocate workspaces CUDA's do not); on "
        "a GPU add the CUDA context and the caching allocator's slack. activations_and_temporaries is the "
        "rest of the peak, so it includes gradients not yet reduced",
    }
