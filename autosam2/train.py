"""`autosam2 train`: load the config, build the parts, hand them to the trainer, tear down in `finally`.

Works alone, under `torchrun` and under `srun`. The seed's flags keep their meaning and map onto the
config; `key=value` arguments override any config field last.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosam2.atomic import atomic_write_text
from autosam2.config import Config, ConfigError, load_config, to_dict, to_yaml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autosam2 train", description="train AutoSAM2 (alone, under torchrun, or under srun)"
    )
    p.add_argument("--config", default=None, help="YAML run config (see configs/)")
    p.add_argument(
        "--checkpoint", default=None, help="official SAM2 checkpoint (model.checkpoint); omit for random init"
    )
    p.add_argument("--batch-size", type=int, default=None, help="clips per rank and step (data.batch_size)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    p.add_argument("--dataset", default=None, choices=["polyp_gen"], help="data.dataset")
    p.add_argument(
        "--gpu", type=int, default=None, help="GPU of a single-process run (under torchrun: LOCAL_RANK's)"
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU (train.device=cpu)")
    p.add_argument("--output-dir", default=None, help="train.output_dir")
    p.add_argument("--engine", default=None, choices=["ddp", "deepspeed"], help="train.engine")
    p.add_argument("--resume", default=None, help="auto | none | a checkpoint folder (train.resume)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.warmup_steps=10")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {
        "model.checkpoint": args.checkpoint,
        "data.batch_size": args.batch_size,
        "train.epochs": args.epochs,
        "optim.lr": args.lr,
        "data.dataset": args.dataset,
        "train.output_dir": args.output_dir,
        "train.engine": args.engine,
        "train.resume": args.resume,
        "train.device": "cpu" if args.cpu else (f"cuda:{args.gpu}" if args.gpu is not None else None),
    }
    mapped = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_config(args.config, mapped + list(args.overrides))


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # the same on every rank: random init must agree before DDP broadcasts


def check_inputs(cfg: Config) -> None:
    """Every input the run reads, checked before anything is written (the launcher calls this too):
    one error naming the first bad one."""
    from autosam2.data.sources import check_source
    from autosam2.engine.checkpoint import Checkpointer
    from autosam2.engine.engines import read_deepspeed_config
    from autosam2.errors import CheckpointError

    check_source(cfg.data.train, "train", cfg.data.clip_len, key="data.train")
    check_source(cfg.data.valid, "valid", key="data.valid")
    files = {"model.checkpoint": cfg.model.checkpoint}
    if cfg.model.prompt.kind == "cnn":
        files["model.prompt.backbone_weights"] = cfg.model.prompt.backbone_weights
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise CheckpointError(f"{key}={path}: file not found")
    if cfg.train.engine == "deepspeed":
        read_deepspeed_config(Path(cfg.train.deepspeed_config))
    if cfg.train.resume not in ("auto", "none"):
        problem = Checkpointer.check(Path(cfg.train.resume))
        if problem:
            raise CheckpointError(
                f"train.resume={cfg.train.resume}: not a checkpoint folder to resume from ({problem})"
            )


def run(argv: list[str] | None = None):
    """Train as the arguments say; returns the final LoopState (`stopped` when a signal ended it early)."""
    args = build_parser().parse_intermixed_args(argv)  # flags may follow key=value overrides
    cfg = config_from_args(args)  # refuses bad config before any heavy work
    check_inputs(cfg)

    from autosam2.engine.dist import cleanup, init_distributed

    info = init_distributed(cfg.train.device)
    try:
        return _run(cfg, info)
    except RuntimeError as err:
        if info.world_size > 1 and _peer_lost(err):
            from autosam2.errors import RankLost

            raise RankLost(
                f"rank {info.rank}: another rank stopped, so this one stops too (that rank's own error says "
                f"why; here: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
            ) from err
        raise
    finally:
        cleanup()


def _peer_lost(err: RuntimeError) -> bool:
    """A collective that failed because another rank went away (gloo closes its connections)."""
    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


LAUNCHER_GRACE_S = 300.0  # a rank whose torchrun is gone checkpoints at the next step, or dies after this


def _launcher_gone(pid: int, stop, rank: int) -> None:
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


def _take_output_dir(out: Path, info):
    """Rank 0 creates the output directory and takes its lock; every rank raises rank 0's error."""
    from autosam2.engine.dist import broadcast_object
    from autosam2.engine.run_lock import RunLock
    from autosam2.errors import OutputDirInUse

    lock, error = None, None
    if info.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(0, "it is a file, not a directory")
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
        except OSError as err:
            error = ConfigError(f"train.output_dir={out}: cannot write there ({err.strerror or err})")
        except OutputDirInUse as err:
            error = err
        if lock is not None and lock.took_over:
            print(f"warning: {lock.took_over}", file=sys.stderr, flush=True)
    error = broadcast_object(error)
    if error is not None:
        raise error
    return lock


def _run(cfg: Config, info):
    from autosam2.engine.checkpoint import Checkpointer, StopSignal, agree_on_resume
    from autosam2.engine.dist import watch_launcher
    from autosam2.engine.engines import build_engine
    from autosam2.model.sam2_builder import build_model

    stop = StopSignal()  # early: a signal during set-up must not kill the job uncheckpointed
    watch_launcher(lambda pid: _launcher_gone(pid, stop, info.rank))
    out = Path(cfg.train.output_dir).resolve()
    seed_everything(cfg.train.seed, info.rank)

    # everything read before anything is written: a bad checkpoint or data set leaves no output behind
    model = build_model(
        cfg.model.variant, cfg.model.image_size, cfg.model.checkpoint, cfg.model.multimask_output
    )
    model.attach_prompt_encoder(cfg.model.prompt)
    model.freeze(cfg.model.freeze)
    model.to(info.device)
    batches, per_epoch, skipped = _training_data(cfg, info)
    total_steps = cfg.train.max_steps or max(1, cfg.train.epochs * per_epoch // cfg.optim.grad_accum)
    engine = build_engine(model, cfg, total_steps, info)

    lock = _take_output_dir(out, info)
    try:
        checkpointer = Checkpointer(out, info)
        folder = agree_on_resume(checkpointer.resolve(cfg.train.resume) if info.is_main else None)
        if info.is_main:
            atomic_write_text(out / "config.yaml", to_yaml(cfg))
        return _train(cfg, info, out, engine, batches, total_steps, skipped, stop, checkpointer, folder)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, info, out: Path, engine, batches, total_steps, skipped, stop, checkpointer, folder):
    from autosam2.data.sources import read_sequences
    from autosam2.engine.checkpoint import save_weights
    from autosam2.engine.dist import barrier, gather_objects
    from autosam2.engine.trainer import LoopState, Trainer
    from autosam2.evaluate import evaluate_sequences, mean_over_sequences, write_overlay_gif
    from autosam2.tracking import default_tracking_uri, flatten_config, make_logger

    state = LoopState()
    if folder is not None:
        state = LoopState(
            **{
                k: v
                for k, v in checkpointer.load(engine, folder).items()
                if k in LoopState.__dataclass_fields__
            }
        )
        state.stopped = False
        if info.is_main:
            print(
                f"resumed from {folder} at step {state.step} (epoch {state.epoch}, batch {state.batch})",
                flush=True,
            )

    uri = cfg.tracking.uri or default_tracking_uri(out)
    logger = make_logger(
        info.rank,
        cfg.tracking.enabled,
        uri,
        cfg.tracking.experiment,
        cfg.tracking.run_name,
        run_id=state.run_id,
        system_metrics=cfg.tracking.system_metrics,
    )
    state.run_id = logger.run_id
    if folder is None:
        logger.log_params(flatten_config(to_dict(cfg)))
    logger.set_tags(
        {
            "git_commit": git_commit(),
            "world_size": str(info.world_size),
            "engine": cfg.train.engine,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
            "device": str(info.device),
        }
    )
    logger.log_artifact(out / "config.yaml")
    model_config = to_dict(cfg)["model"]
    full_weights = cfg.model.checkpoint is None
    if folder is None and info.is_main:  # the model before its first step: the baseline to compare with
        save_weights(out / "initial.pt", engine.module, model_config, full_weights, {"step": 0})

    def validate(step: int) -> dict[str, float] | None:
        limit = cfg.train.valid_sequences
        pictures = out / "valid" / f"step_{step:08d}" / "overlays"
        pictures.mkdir(parents=True, exist_ok=True)
        sequences = read_sequences(
            cfg.data.valid, "valid", info.rank, info.world_size, limit, cfg.data.on_error
        )
        mine = evaluate_sequences(
            engine.module,
            sequences,
            info.device,
            on_sequence=lambda video, probs, _: write_overlay_gif(pictures, video, probs),
        )
        merged: dict[str, dict[str, float]] = {}
        for part in gather_objects(mine):  # also the point where every rank's GIFs are on disk
            merged.update(part)
        if info.is_main and not merged:
            print(
                f"warning: step {step}: no validation sequence could be read; nothing validated",
                file=sys.stderr,
            )
        if not info.is_main or not merged:
            return None
        summary = {f"valid/{k}": v for k, v in mean_over_sequences(merged).items()}
        logger.log_metrics(summary, step)
        _log_per_sequence(logger, out, merged, step)
        logger.log_artifact(pictures, f"valid/step_{step:08d}")  # a folder lands as .../overlays
        print(
            f"step {step} valid dice {summary['valid/dice']:.4f} iou {summary['valid/iou']:.4f} over {len(merged)} sequences",
            flush=True,
        )
        return summary

    def on_best(step: int, results: dict[str, float]) -> None:
        save_weights(out / "best.pt", engine.module, model_config, full_weights, {"step": step, **results})

    trainer = Trainer(
        cfg, engine, batches, total_steps, checkpointer, logger, info, validate, on_best, skipped, stop
    )
    try:
        state = trainer.fit(state)
    except BaseException:
        logger.close("FAILED")
        raise
    if info.is_main and not state.stopped:
        save_weights(out / "final.pt", engine.module, model_config, full_weights, {"step": state.step})
        logger.log_artifact(out / "final.pt", "weights")
        if (out / "best.pt").exists():
            logger.log_artifact(out / "best.pt", "weights")
        print(f"done: {state.step} steps; weights in {out / 'final.pt'}", flush=True)
    if state.stopped and info.is_main:
        print(
            f"stopped by signal at step {state.step}; checkpoint saved, resume with --resume auto", flush=True
        )
    # a stopped run is KILLED in MLflow until the requeued job resumes it (RUNNING again, then FINISHED)
    logger.close("KILLED" if state.stopped else "FINISHED")
    barrier()
    return state


def _log_per_sequence(logger, out: Path, per_sequence: dict[str, dict[str, float]], step: int) -> None:
    from autosam2.evaluate import mean_over_sequences, write_metrics

    folder = out / "valid" / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    write_metrics(folder, per_sequence, mean_over_sequences(per_sequence), {"step": step})
    logger.log_artifact(folder / "metrics.csv", f"valid/step_{step:08d}")


def _training_data(cfg: Config, info) -> tuple[Any, int, Any]:
    """Per-epoch batch iterables, batches per epoch per rank, and the skipped-sample counter."""
    from autosam2.data.clips import FolderClips, collate_or_failure
    from autosam2.data.sources import is_shard_set
    from autosam2.data.stream import (
        ClipStream,
        StreamConfig,
        ignore_stop_signals,
        make_loader,
        raise_worker_failures,
    )

    d = cfg.data
    if is_shard_set(d.train):
        stream_cfg = StreamConfig(
            clip_len=d.clip_len,
            batch_size=d.batch_size,
            image_size=cfg.model.image_size,
            seed=cfg.train.seed,
            shuffle_buffer=d.shuffle_buffer,
            batches_per_epoch=d.batches_per_epoch,
            on_error=d.on_error,
            augment=d.augment,
        )
        stream = ClipStream(d.train, "train", stream_cfg)

        def batches(epoch: int):
            stream.set_epoch(epoch)
            return make_loader(stream, d.num_workers, pin_memory=info.device.type == "cuda")

        return batches, stream.batches_per_rank(info.world_size), lambda: stream.skipped
    clips = FolderClips(
        d.train, "train", d.clip_len, cfg.model.image_size, seed=cfg.train.seed, augment=d.augment
    )
    sampler = torch.utils.data.DistributedSampler(
        clips, info.world_size, info.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    per_epoch = d.batches_per_epoch or max(1, len(sampler) // d.batch_size)

    def folder_batches(epoch: int):
        sampler.set_epoch(epoch)
        clips.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            clips,
            batch_size=d.batch_size,
            sampler=sampler,
            num_workers=d.num_workers,
            collate_fn=collate_or_failure,
            drop_last=True,
            generator=torch.Generator().manual_seed(cfg.train.seed),
            worker_init_fn=ignore_stop_signals,
        )
        return (batch for i, batch in enumerate(raise_worker_failures(loader)) if i < per_epoch)

    return folder_batches, per_epoch, lambda: 0
