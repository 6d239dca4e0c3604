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

from autosam2.arguments import positive_float, positive_int
from autosam2.bench.common import default_device, sync, synthetic_shards
from autosam2.config import ClipMode, Config, DataConfig, Variant, load_config
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

# without --config: the small model these flags describe
FLAG_DEFAULTS = {
    "variant": "hiera_t",
    "image_size": 256,
    "clip_len": 4,
    "batch_size": 1,
    "clip_mode": "video",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config to time (default: the flags below)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--variant", default=None, choices=[v.value for v in Variant], help="default hiera_t")
    p.add_argument("--image-size", type=positive_int, default=None, help="default 256")
    p.add_argument("--clip-len", type=positive_int, default=None, help="default 4")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 1")
    p.add_argument("--clip-mode", default=None, choices=[m.value for m in ClipMode], help="default video")
    p.add_argument(
        "--shards", type=Path, default=None, help="a shard set to read (default: synthetic shards)"
    )
    p.add_argument("--steps", type=positive_int, default=8)
    p.add_argument("--device", default=default_device())
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
    flags = {k: getattr(args, k) for k in FLAG_DEFAULTS}
    if args.config is None:
        flags = {k: FLAG_DEFAULTS[k] if v is None else v for k, v in flags.items()}
    mapped = {
        "model.variant": flags["variant"],
        "model.image_size": flags["image_size"],
        "data.clip_len": flags["clip_len"],
        "data.batch_size": flags["batch_size"],
        "model.clip_mode": flags["clip_mode"],
    }
    overrides = [f"{k}={v}" for k, v in mapped.items() if v is not None]
    if args.config is None:
        overrides += ["model.freeze.mask_decoder=false", "data.num_workers=1"]
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    steps = args.steps
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp, single_process_group(device) as info:
        probe = _config(args, Path(tmp) / "shards", Path(tmp) / "run")
        clip_len, batch, size = probe.data.clip_len, probe.data.batch_size, probe.model.image_size
        shards = args.shards
        if shards is None:
            spec = SynthSpec(
                train_sequences=2, valid_sequences=1, frames=max(8, clip_len * 2), size=size, seed=0
            )
            _, shards = synthetic_shards(Path(tmp), spec, frames_per_sample=clip_len * 2)
        out = Path(tmp) / "run"
        cfg = _config(args, shards, out)
        clip = next(
            iter(ClipStream(shards, "train", DataConfig(clip_len=clip_len, batch_size=batch), size, seed=0))
        )
        memory: dict[str, float] = {}
        flops: list[float] = []

        def timed(trainer: Trainer, batch) -> list[float]:
            """Seconds of each of `steps` train steps on `batch` (the device synchronised after each)."""
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step(batch)
                sync(device)
                times.append(time.perf_counter() - start)
            return times

        def bare_steps(measure: bool = False) -> list[float]:
            trainer = _trainer(cfg, info, steps, TrainingBatches(lambda epoch: [], 0), out, NullLogger())
            if measure and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = timed(trainer, clip)
            if measure and device.type == "cuda":
                memory["max_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
                memory["max_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
            if measure:
                with FlopCounterMode(display=False) as counter:
                    trainer.train_step(clip)
                flops.append(counter.get_total_flops())
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return times[1:]  # the first step warms caches

        def plain_steps(cached: bool) -> list[float]:
            """Steps on the clip as it left the loader (no augmentation: what the feature cache takes),
            through the image encoder or from a cache that holds the clip's frames after the first."""
            trainer = _trainer(
                cfg, info, steps, TrainingBatches(lambda epoch: [], 0), out, NullLogger(), cached
            )
            times = timed(trainer, dataclasses.replace(clip, augment=None))
            del trainer
            gc.collect()
            return times[1:]

        encoded, cached = plain_steps(False), plain_steps(True)
        bare = bare_steps(measure=True)
        data = training_batches(cfg.data, size, cfg.train.seed, 0, 1, pin_memory=device.type == "cuda")
        clock = _StepClock(make_logger(0, True, default_tracking_uri(out), "bench", system_metrics=False))
        try:
            _trainer(cfg, info, steps, data, out, clock).fit(LoopState())
        finally:
            clock.close()
        bare += bare_steps()  # before and after the trainer, so drift on a shared machine hits both
        cached += plain_steps(True)
        encoded += plain_steps(False)
    bare_step = statistics.median(bare)
    trainer_step = statistics.median(b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:], strict=False))
    frames = clip_len * batch
    peak = _peak_flops(device, args.peak_tflops)
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
        "memory": {k: round(v, 3) for k, v in memory.items()} or None,
        "flops_per_step": flops[0],
        "mfu": round(flops[0] / bare_step / peak, 4) if peak else None,
        "peak_flops_assumed": peak,
        "target": {"ratio_trainer_over_bare": 1.10, "met": trainer_step / bare_step <= 1.10},
        "config": {
            "config": str(args.config) if args.config else None,
            "variant": str(cfg.model.variant),
            "image_size": size,
            "clip_len": clip_len,
            "batch_size": batch,
            "clip_mode": str(cfg.model.clip_mode),
            "engine": str(cfg.train.engine),
            "precision": str(cfg.train.precision),
            "num_workers": cfg.data.num_workers,
            "compile": cfg.model.compile,
            "device": str(device),
            "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "steps": steps,
            "torch_threads": torch.get_num_threads(),
        },
        "notes": "medians over steps after the first (bare: run before and after the trainer); both time "
        "Trainer.train_step (device-side augmentation, forward, losses, backward, optimizer step); the full "
        "trainer adds data loading (the config's workers) and loss logging to MLflow (SQLite) every step. "
        "flops_per_step: torch's FLOP counter over one bare step (matrix products and convolutions); mfu: "
        "those over the bare step time and the card's dense bf16 peak; memory: the first bare steps' peak",
    }
