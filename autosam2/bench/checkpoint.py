"""Checkpoint cost: how long the training loop is blocked by one checkpoint, written synchronously vs
asynchronously (a snapshot to host memory, then rank 0's background writer), for a small trainable set
(hiera-t: mask decoder + prompt encoder) and a large one (hiera-b+, everything trainable). Each size
takes one real train step first, so AdamW's moments exist and the checkpoint is full-size; then the same
`Checkpointer` the trainer uses saves `--repeats` times each way into one folder, keeping 2."""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from autosam2.arguments import add_device, add_output_dir, positive_int
from autosam2.bench.common import default_device, synthetic_clip
from autosam2.config import load_config
from autosam2.data.batches import TrainingBatches
from autosam2.engine.checkpoint import Checkpointer, LoopState
from autosam2.engine.dist import single_process_group
from autosam2.engine.engines import build_engine
from autosam2.engine.stop import StopSignal
from autosam2.engine.trainer import Trainer
from autosam2.model.sam2_builder import build_autosam2
from autosam2.tracking import NullLogger

# two trainable-set sizes, by the config overrides that make them: hiera-t with its prompt encoder and mask
# decoder training, and hiera-b+ training whole
SIZES = {
    "hiera_t_decoder_prompt": ["model.variant=hiera_t", "model.freeze.mask_decoder=false"],
    "hiera_b+_full": [
        "model.variant=hiera_b+",
        "model.freeze.image_encoder=false",
        "model.freeze.mask_decoder=false",
        "model.freeze.memory=false",
    ],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=positive_int, default=3, help="saves each way (median reported)")
    p.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="of the one train step (checkpoint size does not depend on it)",
    )
    add_device(p, default_device(), device_alias=True)
    add_output_dir(
        p, "--out", type=Path, default=None, help="where checkpoints go (default: a temporary folder)"
    )


def _one_size(name: str, args: argparse.Namespace, info, root: Path) -> dict[str, Any]:
    out = root / name
    cfg = load_config(
        None,
        SIZES[name]
        + [
            f"model.image_size={args.image_size}",
            "model.checkpoint=null",
            "data.clip_len=1",
            "data.batch_size=1",
            f"train.device={args.device}",
            f"train.output_dir={out}",
        ],
    )
    torch.manual_seed(0)
    model = build_autosam2(cfg.model, info.device).train()
    engine = build_engine(model, cfg, 10, info)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = Trainer(
        cfg,
        engine,
        TrainingBatches(lambda epoch: [], 0),
        10,
        Checkpointer(out, info),
        NullLogger(),
        info,
        stop=StopSignal(()),
    )
    trainer.train_step(synthetic_clip(1, 1, args.image_size))  # AdamW's moments: a full-size checkpoint
    figures: dict[str, Any] = {"trainable_parameters": trainable}
    step = 0
    for mode, asynchronous in (("sync", False), ("async", True)):
        saver = Checkpointer(out, info, keep=2, asynchronous=asynchronous)
        stalls, writes, sizes = [], [], []
        for _ in range(args.repeats):
            step += 1
            saver.save(engine, LoopState(step=step))
            stalls.append(saver.last.stall_s)
            saver.finish()  # the write behind, outside the stall: the next save would wait for it here
            report = saver.take_reports()[-1]
            writes.append(report.write_s)
            sizes.append(report.bytes)
        figures[mode] = {
            "stall_s": round(statistics.median(stalls), 4),
            "write_s": round(statistics.median(writes), 4),
            "MB": round(statistics.median(sizes) / 1e6, 1),
        }
    figures["ratio_sync_stall_over_async_stall"] = round(
        figures["sync"]["stall_s"] / figures["async"]["stall_s"], 2
    )
    del trainer, engine, model
    gc.collect()
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp, single_process_group(device) as info:
        root = args.output_dir or Path(tmp)
        sizes = {name: _one_size(name, args, info, root) for name in args.sizes}
    return {
        "bench": "checkpoint",
        "sizes": sizes,
        "config": {
            "device": str(device),
            "repeats": args.repeats,
            "engine": "ddp",
            "torch_threads": torch.get_num_threads(),
            "out": str(args.output_dir) if args.output_dir else "a temporary folder",
        },
        "notes": "stall_s: the time Checkpointer.save blocks the loop (sync: the whole write and commit; "
        "async: the host snapshot and the per-rank RNG files); write_s: from the save's start to its commit; "
        "MB: the committed step folder. Medians over --repeats saves. The background write shares the CPU "
        "and the disk with training meanwhile, so a step taken during it can run slower",
    }
