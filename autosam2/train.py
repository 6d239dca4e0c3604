"""`autosam2 train`: load the config, build the parts, hand them to the trainer, tear down in `finally`.

Works alone, under `torchrun` and under `srun`. Its flags map onto config fields; `key=value` arguments
override any config field last. Parsing needs only the config (no torch),
so `autosam2 train --help` and the launcher's check are quick.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosam2.arguments import add_device, add_layout, add_output_dir
from autosam2.config import RUN_CONFIGS, Config, EngineKind, FeatureCacheKind, load_config

if TYPE_CHECKING:
    from autosam2.data.batches import TrainingBatches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autosam2 train",
        description="train AutoSAM2 (alone, under torchrun, or under srun)",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"YAML run config: a file, or a shipped one's name ({', '.join(RUN_CONFIGS.names())})",
    )
    p.add_argument(
        "--checkpoint", default=None, help="official SAM2 checkpoint (model.checkpoint); omit for random init"
    )
    p.add_argument("--batch-size", type=int, default=None, help="clips per rank and step (data.batch_size)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    add_layout(p, default=None, help="data.layout: the layout of data.train/data.valid when they are folders")
    p.add_argument("--train-split", default=None, help="data.train_split: the folder's split to train on")
    p.add_argument("--valid-split", default=None, help="data.valid_split: the folder's split to validate on")
    add_device(
        p,
        None,
        gpu_help="GPU N of a single-process run, train.device=cuda:N (under torchrun: LOCAL_RANK's)",
        cpu_help="train on the CPU (train.device=cpu)",
    )
    add_output_dir(p, default=None, help="train.output_dir")
    p.add_argument("--engine", default=None, choices=[e.value for e in EngineKind], help="train.engine")
    p.add_argument("--resume", default=None, help="auto | none | a checkpoint folder (train.resume)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.warmup_steps=10")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {
        "model.checkpoint": args.checkpoint,
        "data.batch_size": args.batch_size,
        "train.epochs": args.epochs,
        "optim.lr": args.lr,
        "data.layout": args.layout,
        "data.train_split": args.train_split,
        "data.valid_split": args.valid_split,
        "train.output_dir": args.output_dir,
        "train.engine": args.engine,
        "train.resume": args.resume,
        "train.device": args.device,
    }
    mapped = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_config(args.config, mapped + list(args.overrides))


def parse_config(argv: list[str] | None = None) -> Config:
    """The run config of `autosam2 train` arguments (flags may follow key=value overrides); credentials in
    ``tracking.uri`` move to MLflow's variables, out of the config and everything logged from it."""
    from autosam2.tracking import take_uri_credentials

    cfg = config_from_args(build_parser().parse_intermixed_args(argv))
    cfg.tracking.uri = take_uri_credentials(cfg.tracking.uri)
    return cfg


def run(argv: list[str] | None = None):
    """Train as the arguments say; returns the final LoopState (`stopped` when a signal ended it early)."""
    cfg = parse_config(argv)  # refuses bad config before any heavy work

    from autosam2.engine.dist import distributed, single_process_group
    from autosam2.engine.inputs import check_inputs
    from autosam2.engine.startup import mark
    from autosam2.model.sam2_checkpoint import settle_model

    check_inputs(cfg)
    cfg.model = settle_model(cfg.model)  # the size and release the checkpoint holds, logged and recorded
    mark("inputs_checked")
    with distributed(cfg.train.device, cfg.train.dist_timeout_s, cfg.train.peer_timeout_s) as info:
        mark("group_joined")
        if info.world_size == 1 and cfg.train.engine == EngineKind.deepspeed:
            # DeepSpeed wants a process group; without a launcher's it would go looking for MPI
            with single_process_group(info.device, cfg.train.dist_timeout_s) as alone:
                return _run(cfg, alone)
        return _run(cfg, info)


def main(argv: list[str] | None = None) -> int:
    """0 when the run finished; `EXIT_STOPPED` when a signal stopped it early (it goes on with --resume auto)."""
    from autosam2.engine.stop import EXIT_STOPPED, settle

    try:
        state = run(argv)
    finally:
        settle()  # how the run ended decides the status, not a signal while the process shuts down
    return EXIT_STOPPED if state.stopped else 0


def _run(cfg: Config, info):
    """Set up this process, build the parts (reading everything before anything is written: a bad
    checkpoint or data set leaves no output behind), then train in the locked output directory."""
    from autosam2.engine.run_lock import disarm, guard, take_output_dir
    from autosam2.engine.startup import mark

    stop, hosts, threads = _set_up_process(cfg, info)
    parts = _build_parts(cfg, info)
    mark("parts_built")
    out = Path(cfg.train.output_dir).resolve()
    lock = take_output_dir(out, info)
    over = False  # the run is complete: its submission's reservation goes with the lock
    try:
        state = _train(cfg, info, out, parts, stop, (hosts, threads))
        over = not state.stopped
        return state
    except BaseException:
        guard("its error")  # a rank whose run moved on leaves here, before its error reaches the job's files
        raise
    finally:
        if parts.features is not None:
            parts.features.close()  # the disk tier's files: a cache, not an output
        if lock is not None:
            lock.release(reservation=over)
        disarm()


def _set_up_process(cfg: Config, info):
    """Stop signals first (a signal during set-up must not kill the job uncheckpointed), then seeds,
    backends and threads; (stop signal, each rank's host, torch threads and where that count came from)."""
    from autosam2.engine.dist import (
        announce_ranks,
        configure_backends,
        configure_threads,
        seed_everything,
        stop_when_launcher_gone,
    )
    from autosam2.engine.stop import StopSignal

    stop = StopSignal(announce=info.is_main)
    stop_when_launcher_gone(stop, info.rank)
    seed_everything(cfg.train.seed, info.rank)
    configure_backends(cfg.train.cudnn_benchmark, cfg.train.tf32)
    threads = configure_threads(cfg.train.threads)
    hosts = announce_ranks(info)
    if info.is_main:
        print(f"threads: {threads[0]} torch threads per rank ({threads[1]})", flush=True)
    return stop, hosts, threads


@dataclass
class _Parts:
    """What a run is built from before it writes anything."""

    model: Any
    data: TrainingBatches
    engine: Any
    features: Any  # a FeatureCache, or None
    total_steps: int


def _build_parts(cfg: Config, info) -> _Parts:
    """The model (its weights from train.init_from when set), the training batches, the planned steps,
    the engine and the feature cache."""
    from autosam2.data.sources import training_batches
    from autosam2.engine.dist import gather_objects
    from autosam2.engine.engines import build_engine, use_autocast
    from autosam2.engine.resume import planned_steps
    from autosam2.model.feature_cache import feature_cache
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import init_from_weights

    model = build_autosam2(cfg.model, info.device)
    if cfg.train.init_from:
        extra = init_from_weights(model, cfg.train.init_from, cfg.model)
        if info.is_main:
            print(
                f"initialised from {cfg.train.init_from} (step {extra.get('step', '?')} of its run): its "
                "weights only; optimizer, schedule and step start fresh",
                flush=True,
            )
    data = training_batches(
        cfg.data, cfg.model.image_size, cfg.train.seed, info.rank, info.world_size, info.device.type == "cuda"
    )
    total_steps = planned_steps(cfg, data, info.world_size)
    if info.is_main:
        print(data.describe(info.world_size, cfg.data), flush=True)
    engine = build_engine(model, cfg, total_steps, info)
    features = None
    if cfg.data.feature_cache == FeatureCacheKind.memory:
        autocast = use_autocast(cfg.train.precision, info.device)
        share = gather_objects if info.world_size > 1 else None
        out = Path(cfg.train.output_dir)
        features = feature_cache(model.image_encoder, cfg.data, autocast, share, (out, info.rank))
    return _Parts(model, data, engine, features, total_steps)


def _train(
    cfg: Config, info, out: Path, parts: _Parts, stop, where: tuple[list[tuple[str, str]], tuple[int, str]]
):
    """Resume (the checkpoint's settings reconciled with this run's), start tracking (`where`: each
    rank's host, the torch threads), train, and finish the weights and the MLflow run; the final
    LoopState."""
    from autosam2.engine.checkpoint import Checkpointer
    from autosam2.engine.dist import barrier
    from autosam2.engine.resume import reconcile
    from autosam2.engine.trainer import Trainer
    from autosam2.engine.validator import Validator
    from autosam2.model.weights import RunWeights

    engine = parts.engine
    checkpointer = Checkpointer(out, info, cfg.train.keep_checkpoints, cfg.train.checkpoint_async)
    state = checkpointer.resume(engine, cfg.train.resume)
    total_steps = reconcile(cfg, state, engine, parts.data, info, parts.total_steps)
    logger = _start_tracking(cfg, info, out, state, *where)
    if parts.data.mix:  # the sets, their weights and samples, beside the params data.train*
        logger.set_tags({"data_mix": parts.data.describe(info.world_size, cfg.data)})
    weights = RunWeights(
        out, engine.module, cfg.model, info.is_main, cfg.train.full_weights, cfg.train.init_from
    )
    if state.step == 0:  # the model before its first step: the baseline to compare with
        weights.begin()
    validator = Validator(cfg, engine.module, info, logger, out, weights)
    trainer = Trainer(
        cfg, engine, parts.data, total_steps, checkpointer, logger, info, validator, stop, parts.features
    )
    try:
        state = trainer.fit(state)
    except BaseException:
        logger.close("FAILED")
        raise
    _finish(state, weights, logger, info.is_main)
    barrier()
    return state


def _start_tracking(
    cfg: Config, info, out: Path, state, hosts: list[tuple[str, str]], threads: tuple[int, str]
):
    """The config in effect into the run directory, headed by the changes the run made as it resumed,
    and the run's MLflow run (resumed with the state's; a changed value goes to a `param_changed.KEY`
    tag, as MLflow keeps a param's first value, and the changes to the tag `resumed_changes`)."""
    from autosam2.atomic import atomic_write_text
    from autosam2.config import to_dict, to_yaml
    from autosam2.engine.resume import describe
    from autosam2.tracking import flatten_config, start_run, training_run_name

    changes = describe(state.changes)
    if info.is_main:
        head = "".join(f"#   {line}\n" for line in changes)
        if head:
            head = "# the values in effect; the run changed these as it resumed:\n" + head
        atomic_write_text(out / "config.yaml", head + to_yaml(cfg))
    tags = {
        "world_size": str(info.world_size),
        "engine": str(cfg.train.engine),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
        "device": str(info.device),
        "hosts": ",".join(dict.fromkeys(name for name, _ in hosts)),  # each host once, in rank order
        "torch_threads": str(threads[0]),  # a tag, not a param: a requeued job may get other CPUs
        "torch_threads_from": threads[1],
    }
    if changes:
        tags["resumed_changes"] = "; ".join(changes)
    params = flatten_config(to_dict(cfg))
    name = training_run_name(cfg.model.variant, cfg.model.clip_mode, out)
    logger = start_run(cfg.tracking, out, info.rank, state.run_id, params, tags, out / "config.yaml", name)
    state.run_id = logger.run_id
    return logger


def _finish(state, weights, logger, is_main: bool) -> None:
    """After the loop: ``final.pt`` and the weights artifacts of a complete run (``base.pt`` too, where
    they build on it), the MLflow status (a stopped run is KILLED until the requeued job resumes it:
    RUNNING again, then FINISHED)."""
    from autosam2.engine.run_lock import guard

    guard("the final weights")
    if is_main and not state.stopped:
        final = weights.save("final.pt", state.step)
        for path in (final, weights.out / "best.pt", weights.base_file):
            if path is not None and path.exists():
                logger.log_artifact(path, "weights")
        print(f"done: {state.step} steps; weights in {final}", flush=True)
    if is_main and state.stopped:
        print(
            f"stopped by signal at step {state.step}; checkpoint saved, resume with --resume auto", flush=True
        )
    # a stopped job has SLURM's grace period to leave in: what it cannot send now, the requeued job sends
    logger.close("KILLED" if state.stopped else "FINISHED", flush_timeout_s=10.0 if state.stopped else None)
