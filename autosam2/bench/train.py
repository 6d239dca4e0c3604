"""Training step time: the full trainer (stream and loader worker, device-side augmentation, the engine,
MLflow logging every step) against the bare `train_step` of the same model on one clip held in memory.
Both run the trainer's own `train_step`; the ratio is what the loop around it costs."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from autosam2.bench.common import default_device, sync, synthetic_shards
from autosam2.config import ClipMode, Config, Variant, load_config
from autosam2.data.sources import TrainingBatches, training_batches
from autosam2.data.stream import ClipStream, StreamConfig
from autosam2.data.synthetic import SynthSpec
from autosam2.engine.checkpoint import Checkpointer, LoopState, StopSignal
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import build_engine
from autosam2.engine.trainer import Trainer
from autosam2.model.sam2_builder import build_autosam2
from autosam2.tracking import MetricLogger, NullLogger, default_tracking_uri, make_logger


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="hiera_t", choices=[v.value for v in Variant])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--clip-len", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--clip-mode", default="video", choices=[m.value for m in ClipMode])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default=default_device())


class _StepClock:
    """A MetricLogger that notes when each step's training metrics arrive and passes everything on."""

    def __init__(self, inner: MetricLogger):
        self.inner = inner
        self.stamps: list[float] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if "train/loss_total" in metrics:
            self.stamps.append(time.perf_counter())
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _trainer(cfg: Config, info: DistInfo, steps: int, data: TrainingBatches, out: Path, logger) -> Trainer:
    torch.manual_seed(0)
    model = build_autosam2(cfg.model, info.device).train()
    engine = build_engine(model, cfg, steps, info)
    return Trainer(cfg, engine, data, steps, Checkpointer(out, info), logger, info, stop=StopSignal(()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = DistInfo(0, 1, 0, torch.device(args.device))
    steps = args.steps
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        spec = SynthSpec(
            train_sequences=2,
            valid_sequences=1,
            frames=max(8, args.clip_len * 2),
            size=args.image_size,
            seed=0,
        )
        _, shards = synthetic_shards(Path(tmp), spec, frames_per_sample=args.clip_len * 2)
        out = Path(tmp) / "run"
        overrides = [
            f"data.train={shards}",
            f"data.clip_len={args.clip_len}",
            f"data.batch_size={args.batch_size}",
            "data.num_workers=1",
            f"data.batches_per_epoch={steps + 2}",
            f"model.variant={args.variant}",
            f"model.image_size={args.image_size}",
            f"model.clip_mode={args.clip_mode}",
            "model.freeze.mask_decoder=false",
            f"train.device={args.device}",
            f"train.max_steps={steps}",
            "train.epochs=1000",
            "train.log_every=1",
            f"train.checkpoint_every={steps + 1}",
            f"train.output_dir={out}",
        ]
        cfg = load_config(None, overrides)
        stream_cfg = StreamConfig(
            clip_len=args.clip_len, batch_size=args.batch_size, image_size=args.image_size
        )
        clip = next(iter(ClipStream(shards, "train", stream_cfg)))

        def bare_steps() -> list[float]:
            trainer = _trainer(cfg, info, steps, TrainingBatches(lambda epoch: [], 0), out, NullLogger())
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step(clip)
                sync(info.device)
                times.append(time.perf_counter() - start)
            return times[1:]  # the first step warms caches

        bare = bare_steps()
        data = training_batches(cfg.data, cfg.model.image_size, cfg.train.seed, 0, 1)
        clock = _StepClock(make_logger(0, True, default_tracking_uri(out), "bench", system_metrics=False))
        try:
            _trainer(cfg, info, steps, data, out, clock).fit(LoopState())
        finally:
            clock.close()
        bare += bare_steps()  # before and after the trainer, so drift on a shared machine hits both
    bare_step = statistics.median(bare)
    trainer_step = statistics.median(b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:], strict=False))
    return {
        "bench": "train",
        "step_s": {"bare_forward_backward": round(bare_step, 4), "full_trainer": round(trainer_step, 4)},
        "ratio_trainer_over_bare": round(trainer_step / bare_step, 3),
        "target": {"ratio_trainer_over_bare": 1.10, "met": trainer_step / bare_step <= 1.10},
        "config": {
            "variant": args.variant,
            "image_size": args.image_size,
            "clip_len": args.clip_len,
            "batch_size": args.batch_size,
            "clip_mode": args.clip_mode,
            "device": args.device,
            "steps": steps,
            "torch_threads": torch.get_num_threads(),
        },
        "notes": "medians over steps after the first (bare: run before and after the trainer); both time "
        "Trainer.train_step (device-side augmentation, forward, losses, backward, optimizer step); the full "
        "trainer adds data loading (1 worker) and loss logging to MLflow (SQLite) every step",
    }
