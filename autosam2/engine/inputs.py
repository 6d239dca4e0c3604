"""Every input a training run reads, checked before anything is written (by `autosam2 train` on every
rank, and by the launcher before it submits): one error naming the first bad one."""

from __future__ import annotations

from pathlib import Path

from autosam2.config import Config, EngineKind, PromptKind
from autosam2.data.sources import check_source, check_training_sources
from autosam2.engine.checkpoint import Checkpointer
from autosam2.engine.engines import read_deepspeed_config, require_deepspeed
from autosam2.errors import CheckpointError
from autosam2.model.sam2_checkpoint import settle_model
from autosam2.outputs import apart_from_inputs


def check_inputs(cfg: Config) -> None:
    # a run writes beside what it reads only outside it: a later `shards build --overwrite` of the set
    # would take the run with it
    inputs = [*cfg.data.train_sources(), cfg.data.valid, cfg.model.checkpoint, cfg.train.init_from]
    apart_from_inputs(Path(cfg.train.output_dir), inputs, holding=False)
    data = cfg.data
    check_training_sources(data)
    check_source(data.valid, "valid", None, "data.valid", data.layout, data.valid_split)
    files = {"model.checkpoint": cfg.model.checkpoint, "train.init_from": cfg.train.init_from}
    if cfg.model.prompt.kind == PromptKind.cnn:
        files["model.prompt.backbone_weights"] = cfg.model.prompt.backbone_weights
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise CheckpointError(f"{key}={path}: file not found")
    settle_model(cfg.model)  # the checkpoint is SAM2's, of the size and release asked
    if cfg.train.engine == EngineKind.deepspeed:
        require_deepspeed()
        read_deepspeed_config(Path(cfg.train.deepspeed_config))
    if cfg.train.resume not in ("auto", "none"):
        problem = Checkpointer.check(Path(cfg.train.resume))
        if problem:
            raise CheckpointError(
                f"train.resume={cfg.train.resume}: not a checkpoint folder to resume from ({problem})"
            )
