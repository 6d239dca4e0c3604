"""Training step time: the full trainer (stream and loader workers, device-side augmentation, the engine,
MLflow logging every step) against the bare `train_step` of the same model on one clip held in memory.
Both run the trainer's own `train_step` inside a process group (of this process alone), so DDP's reducer
or DeepSpeed's ZeRO runs as in a job; the ratio is what the loop around it costs. With `--config`, the
run config's model, clip, batch, engine and loader workers are timed (its data paths are replaced by
synthetic shards at its image size); on a GPU the peak memory and an MFU estimate come with it."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from autosam2.arguments import add_device, positive_float, positive_int
from autosam2.bench.common import default_device, run_config, sync, synthetic_shards
from autosam2.config import DEFAULT_VARIANT, ClipMode, Config, DataConfig, ModelConfig, Variant, load_config
from autosam2.data.batches import TrainingBatches
from autosam2.data.sources import training_batches
from autosam2.data.stream import ClipStream
from autosam2.data.synthetic import SynthSpec
from autosam2.engine.checkpoint import Checkpointer, LoopState
from autosam2.engine.dist import DistInfo, single_process_group
from autosam2.engine.engines import build_engine
from autosam2.engine.stop import StopSignal
from autosam2.engine.trainer import Trainer
from autosam2.model.feature_cache import FeatureCache
from autosam2.model.sam2_builder import build_autosam2
from autosam2.tracking import MetricLogger, NullLogger, default_tracking_uri, make_logger

# dense bf16 matrix throughput by card name (datasheet figures, FLOP/s), for the MFU estimate
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

# without --config: a small model, so that a step takes seconds on a CPU; the rest is config.py's defaults
SMALL_MODEL = {
    "model.image_size": "256",
    "data.clip_len": "4",
    "model.freeze.mask_decoder": "false",
    "data.num_workers": "1",
}
# flag -> the config field it sets
FLAG_FIELDS = {
    "variant": "model.variant",
    "image_size": "model.image_size",
    "clip_len": "data.clip_len",
    "batch_size": "data.batch_size",
    "clip_mode": "model.clip_mode",
}

NOTES = (
    "medians over steps after the first (bare: run before and after the trainer); both time "
    "Trainer.train_step (device-side augmentation, forward, losses, backward, optimizer step); the full "
    "trainer adds data loading (the config's workers) and loss logging to MLflow (SQLite) every step. "
    "flops_per_step: torch's FLOP counter over one bare step (matrix products and convolutions); mfu: "
    "those over the bare step time and the card's dense bf16 peak; memory: the first bare steps' peak"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    model, data = ModelConfig(), DataConfig()
    p.add_argument("--config", type=Path, default=None, help="run config to time (default: the flags below)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    small = "without --config: {}; else the config's"
    p.add_argument(
        "--variant",
        default=None,
        choices=[v.value for v in Variant],
        help=f"model.variant (default {DEFAULT_VARIANT})",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="model.image_size (default " + small.format(SMALL_MODEL["model.image_size"]) + ")",
    )
    p.add_argument(
        "--clip-len",
        type=positive_int,
        default=None,
        help="data.clip_len (default " + small.format(SMALL_MODEL["data.clip_len"]) + ")",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"clips per rank and step, data.batch_size (default {data.batch_size})",
    )
    p.add_argument(
        "--clip-mode",
        default=None,
        choices=[m.value for m in ClipMode],
        help=f"model.clip_mode (default {model.clip_mode})",
    )
    p.add_argument(
        "--shards", type=Path, default=None, help="a shard set to read (default: synthetic shards)"
    )
    p.add_argument("--steps", type=positive_int, default=8)
    add_device(p, default_device(), device_alias=True)
    p.add_argument(
        "--peak-tflops", type=positive_float, default=None, help="the card's dense bf16 TFLOP/s, for MFU"
    )


class _StepClock:
    """A MetricLogger that notes when each step's training metrics arrive, and their data-wait share,
    and passes everything on."""

    def __init__(self, inner: MetricLogger):
        self.inner = inner
        self.stamps: list[float] = []
        self.wait_shares: list[float] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if "train/loss_total" in metrics:
            self.stamps.append(time.perf_counter())
            self.wait_shares.append(float(metrics["train/data_wait_share"]))
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _config(args: argparse.Namespace, shards: Path, out: Path) -> Config:
    overrides = [f"{k}={v}" for k, v in SMALL_MODEL.items()] if args.config is None else []
    overrides += [f"{FLAG_FIELDS[k]}={getattr(args, k)}" for k in FLAG_FIELDS if getattr(args, k) is not None]
    overrides += [
        f"data.train={shards}",
        f"data.batches_per_epoch={args.steps + 2}",
        "model.checkpoint=null",  # random weights: speed and memory do not depend on their values
        f"train.device={args.device}",
        f"train.max_steps={args.steps}",
        "train.epochs=1000",
        "train.log_every=1",
        f"train.checkpoint_every={args.steps + 1}",
        f"train.output_dir={out}",
    ]
    return load_config(args.config, overrides + list(args.overrides))


def _trainer(
    cfg: Config, info: DistInfo, steps: int, data: TrainingBatches, out: Path, logger, cached: bool = False
) -> Trainer:
    torch.manual_seed(0)
    model = build_autosam2(cfg.model, info.device).train()
    engine = build_engine(model, cfg, steps, info)
    features = FeatureCache(model.image_encoder, 2**40) if cached else None
    return Trainer(
        cfg,
        engine,
        data,
        steps,
        Checkpointer(out, info),
        logger,
        info,
        stop=StopSignal(()),
        features=features,
    )


def _peak_flops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for card, flops in PEAK_BF16_FLOPS.items() if card in name), None)


class _BareSteps:
    """Trainers without data on one clip held in memory: the bare step's times (and, once, its peak
    memory and FLOPs), and the un-augmented step through the image encoder or from a feature cache."""

    def __init__(self, cfg: Config, info: DistInfo, steps: int, clip, out: Path):
        self.cfg, self.info, self.steps, self.clip, self.out = cfg, info, steps, clip, out
        self.device = info.device
        self.memory: dict[str, float] = {}
        self.flops: list[float] = []

    def _trainer(self, cached: bool = False) -> Trainer:
        no_data = TrainingBatches(lambda epoch: [], 0)
        return _trainer(self.cfg, self.info, self.steps, no_data, self.out, NullLogger(), cached)

    def _timed(self, trainer: Trainer, batch) -> list[float]:
        """Seconds of each of `steps` train steps on `batch` (the device synchronised after each)."""
        times = []
        for _ in range(self.steps):
            start = time.perf_counter()
            trainer.train_step(batch)
            sync(self.device)
            times.append(time.perf_counter() - start)
        return times

    def bare(self, measure: bool = False) -> list[float]:
        trainer = self._trainer()
        cuda = self.device.type == "cuda"
        if measure and cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = self._timed(trainer, self.clip)
        if measure and cuda:
            self.memory["max_allocated_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.memory["max_reserved_GiB"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        if measure:
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(self.clip)
            self.flops.append(counter.get_total_flops())
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return times[1:]  # the first step warms caches

    def plain(self, cached: bool) -> list[float]:
        """Steps on the clip as it left the loader (no augmentation: what the feature cache takes),
        through the image encoder or from a cache that holds the clip's frames after the first."""
        trainer = self._trainer(cached)
        times = self._timed(trainer, dataclasses.replace(self.clip, augment=None))
        del trainer
        gc.collect()
        return times[1:]


def _inputs(args: argparse.Namespace, tmp: Path) -> tuple[Config, Any]:
    """The run config over the shards (synthetic ones at its clip and image size unless --shards),
    and one clip of them as the loader yields it."""
    probe = _config(args, tmp / "shards", tmp / "run")
    clip_len, batch, size = probe.data.clip_len, probe.data.batch_size, probe.model.image_size
    shards = args.shards
    if shards is None:
        spec = SynthSpec(train_sequences=2, valid_sequences=1, frames=max(8, clip_len * 2), size=size, seed=0)
        _, shards = synthetic_shards(tmp, spec, frames_per_sample=clip_len * 2)
    cfg = _config(args, shards, tmp / "run")
    stream = ClipStream(shards, "train", DataConfig(clip_len=clip_len, batch_size=batch), size, seed=0)
    return cfg, next(iter(stream))


def _full_trainer(cfg: Config, info: DistInfo, steps: int, out: Path) -> _StepClock:
    """The whole trainer fitted for `steps`, its loader and MLflow logging included; the clock of its steps."""
    size, device = cfg.model.image_size, info.device
    data = training_batches(cfg.data, size, cfg.train.seed, 0, 1, pin_memory=device.type == "cuda")
    clock = _StepClock(make_logger(0, True, default_tracking_uri(out), "bench", system_metrics=False))
    try:
        _trainer(cfg, info, steps, data, out, clock).fit(LoopState())
    finally:
        clock.close()
    return clock


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp, single_process_group(device) as info:
        cfg, clip = _inputs(args, Path(tmp))
        steps = _BareSteps(cfg, info, args.steps, clip, Path(tmp) / "run")
        encoded, cached = steps.plain(False), steps.plain(True)
        bare = steps.bare(measure=True)
        clock = _full_trainer(cfg, info, args.steps, Path(tmp) / "run")
        bare += steps.bare()  # before and after the trainer, so drift on a shared machine hits both
        cached += steps.plain(True)
        encoded += steps.plain(False)
    bare_step = statistics.median(bare)
    trainer_step = statistics.median(b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:], strict=False))
    frames = cfg.data.clip_len * cfg.data.batch_size
    peak = _peak_flops(device, args.peak_tflops)
    flops = steps.flops[0]
    return {
        "bench": "train",
        "step_s": {"bare_forward_backward": round(bare_step, 4), "full_trainer": round(trainer_step, 4)},
        "ratio_trainer_over_bare": round(trainer_step / bare_step, 3),
        # data.feature_cache=memory: the step once the cache holds the clip's frames, against the same
        # un-augmented step through the frozen image encoder; the encoder's share of a step is 1 - 1/ratio
        "feature_cache": {
            "step_s": {
                "through_encoder": round(statistics.median(encoded), 4),
                "cached": round(statistics.median(cached), 4),
            },
            "ratio_encoder_over_cached": round(statistics.median(encoded) / statistics.median(cached), 3),
        },
        "frames_per_s": {
            "bare": round(frames / bare_step, 2),
            "full_trainer": round(frames / trainer_step, 2),
        },
        # the steps after the first: the first waits for the loader workers to start
        "data_wait_share": round(statistics.mean(clock.wait_shares[1:] or clock.wait_shares), 4),
        "memory": {k: round(v, 3) for k, v in steps.memory.items()} or None,
        "flops_per_step": flops,
        "mfu": round(flops / bare_step / peak, 4) if peak else None,
        "peak_flops_assumed": peak,
        "target": {"ratio_trainer_over_bare": 1.10, "met": trainer_step / bare_step <= 1.10},
        "config": _described(args, cfg, device),
        "notes": NOTES,
    }


def _described(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict[str, Any]:
    """What was timed, as the figures record it."""
    return {
        **run_config(args.config, cfg),
        "engine": str(cfg.train.engine),
        "num_workers": cfg.data.num_workers,
        "compile": cfg.model.compile,
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
    }
