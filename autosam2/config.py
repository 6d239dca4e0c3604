"""The run configuration: one typed dataclass tree, read from YAML with OmegaConf, dotted key=value overrides.

Unknown keys and wrong types are refused (OmegaConf structured configs) before any heavy work, and
`validate` checks the values that types cannot. The merged config is written into the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from autosam2.data.transforms import AugmentConfig
from autosam2.losses import LossWeights
from autosam2.model.autosam2 import FreezeConfig
from autosam2.model.prompt_encoder import PromptEncoderConfig
from autosam2.model.sam2_builder import CONFIGS


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names it."""


@dataclass
class DataConfig:
    dataset: str = "polyp_gen"
    train: str = "demo/shards/train"  # a shard set (manifest.json) or a polyp_gen root (split train)
    valid: str = "demo/shards/valid"  # a shard set or a polyp_gen root (split valid)
    clip_len: int = 8
    batch_size: int = 1  # clips per rank and step
    num_workers: int = 2
    shuffle_buffer: int = 64
    batches_per_epoch: int | None = None  # per rank; None: samples / (batch x ranks)
    on_error: str = "raise"  # raise | skip
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    variant: str = "hiera_t"
    image_size: int = 1024
    checkpoint: str | None = None  # official SAM2 checkpoint; None: random init
    multimask_output: bool = False
    clip_mode: str = "video"  # video: frames 1.. attend to memory; frame: every frame conditioning
    prompt: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    grad_clip: float = 0.1
    grad_accum: int = 1


@dataclass
class TrainConfig:
    epochs: int = 50
    max_steps: int | None = None  # optimizer steps; None: epochs x batches per epoch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"  # bf16 (autocast, GPU only) | fp32
    engine: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    output_dir: str = "output"
    checkpoint_every: int = 500  # optimizer steps
    validate_every: int = 500
    log_every: int = 10
    resume: str = "auto"  # auto: latest checkpoint in output_dir if any | none | a checkpoint folder
    max_bad_steps: int = 5  # non-finite losses in a row before the run aborts
    valid_sequences: int | None = None  # validate on the first N sequences only


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: SQLite inside the output directory
    experiment: str = "autosam2"
    run_name: str | None = None
    system_metrics: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; refused with one ConfigError."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from err
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_describe(err)}") from err
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    return f"{key}: {message}" if key else message


def validate(cfg: Config) -> None:
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(
        cfg.model.variant in CONFIGS,
        f"model.variant must be one of {sorted(CONFIGS)}, got {cfg.model.variant!r}",
    )
    need(
        cfg.model.image_size % 32 == 0 and cfg.model.image_size >= 64,
        f"model.image_size must be a multiple of 32 and >= 64, got {cfg.model.image_size}",
    )
    need(
        cfg.model.clip_mode in ("video", "frame"),
        f"model.clip_mode must be video or frame, got {cfg.model.clip_mode!r}",
    )
    need(
        cfg.model.prompt.kind in ("features", "cnn"),
        f"model.prompt.kind must be features or cnn, got {cfg.model.prompt.kind!r}",
    )
    need(
        cfg.data.dataset == "polyp_gen",
        f"data.dataset: only polyp_gen is supported, got {cfg.data.dataset!r}",
    )
    need(
        cfg.data.clip_len >= 1 and cfg.data.batch_size >= 1, "data.clip_len and data.batch_size must be >= 1"
    )
    need(
        cfg.data.on_error in ("raise", "skip"),
        f"data.on_error must be raise or skip, got {cfg.data.on_error!r}",
    )
    need(
        cfg.train.engine in ("ddp", "deepspeed"),
        f"train.engine must be ddp or deepspeed, got {cfg.train.engine!r}",
    )
    need(
        cfg.train.precision in ("bf16", "fp32"),
        f"train.precision must be bf16 or fp32, got {cfg.train.precision!r}",
    )
    need(
        cfg.train.device == "auto" or cfg.train.device == "cpu" or cfg.train.device.startswith("cuda"),
        f"train.device must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}",
    )
    need(
        cfg.optim.lr > 0 and cfg.optim.grad_accum >= 1 and len(cfg.optim.betas) == 2,
        "optim.lr must be > 0, optim.grad_accum >= 1, optim.betas two numbers",
    )
    need(
        cfg.train.epochs >= 1
        and cfg.train.checkpoint_every >= 1
        and cfg.train.validate_every >= 1
        and cfg.train.log_every >= 1,
        "train.epochs, checkpoint_every, validate_every and log_every must be >= 1",
    )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
