"""The run configuration: one typed dataclass tree, read from YAML with OmegaConf, dotted key=value overrides.

The ground floor of the project: every module may import it, it imports none of ours, nor torch, sam2 or
torchvision, so checking a config (the launcher on a login node does) costs only OmegaConf. Choices are
Enums that compare, print and format as their value (`cfg.train.engine == "ddp"`). Unknown keys, wrong
types and choices outside their Enum are refused by OmegaConf's structured configs before any heavy work;
`validate` checks the values that types cannot. The merged config is written into the run directory.
The configs the package ships (autosam2/configs/) are found by name: `RUN_CONFIGS`, `DEEPSPEED_CONFIGS`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# train.bucket_mb's ceiling (1 TiB of fp32 gradients): DDP takes the bytes as a C++ size
MAX_BUCKET_MB = 2**20


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names it."""


# choices ------------------------------------------------------------------------------------------------


class Layout(StrEnum):
    """Dataset folder layouts (`autosam2.data.layouts`); auto: told by the folders."""

    auto = "auto"
    polyp_gen = "polyp_gen"  # the seed's ROOT/<split>/{images,masks}/<sequence>/
    sunseg = "sunseg"  # SUN-SEG: ROOT/TrainDataset|TestEasyDataset/Seen|.../{Frame,GT}/<case>/
    polypgen = "polypgen"  # PolypGen: multi-centre single frames and sequence data
    images = "images"  # a flat image set: images/ + masks/ (Kvasir-SEG, CVC), optional sequences CSV


# SAM2 model sizes; the names are what users write (`model.variant=hiera_b+`), not identifiers
Variant = StrEnum("Variant", [(v, v) for v in ("hiera_t", "hiera_s", "hiera_b+", "hiera_l")], module=__name__)
# SAM2's releases, named as Meta names their configs and checkpoints: sam2 (SAM 2.0), sam2.1
Release = StrEnum("Release", [(v, v) for v in ("sam2", "sam2.1")], module=__name__)
# what model.variant and model.release left unset build without a checkpoint (with one: what it holds)
DEFAULT_VARIANT, DEFAULT_RELEASE = Variant["hiera_t"], Release["sam2.1"]


class ClipMode(StrEnum):
    video = "video"  # frame 0 conditions, frames 1.. attend to SAM2's memory
    frame = "frame"  # every frame a conditioning frame, no memory


class PromptKind(StrEnum):
    features = "features"  # a light head over SAM2's own FPN features
    cnn = "cnn"  # AutoSAM's design: a separate torchvision CNN on the image


class PromptBackbone(StrEnum):
    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"
    resnet101 = "resnet101"


OnError = StrEnum("OnError", [("raise", "raise"), ("skip", "skip")], module=__name__)
# global: one order of the whole set per (seed, epoch), the same at any world size and worker count, resumed
# by seeking; resample: each (rank, worker) draws shards with replacement from its own RNG (exact resume
# only at the same world size and worker count, by replaying the epoch's batches)
Order = StrEnum("Order", [("global", "global"), ("resample", "resample")], module=__name__)


class FeatureCacheKind(StrEnum):
    none = "none"
    memory = "memory"  # the frozen image encoder's output per frame, in each rank's host memory


class FeatureCacheDtype(StrEnum):
    fp32 = "fp32"  # as the encoder gives it: the model gets the encoder's own numbers
    bf16 = "bf16"  # half the bytes per frame; handed back in the encoder's dtype


class Precision(StrEnum):
    bf16 = "bf16"  # autocast over fp32 weights, on GPUs; CPU runs stay fp32
    fp32 = "fp32"


class EngineKind(StrEnum):
    ddp = "ddp"
    deepspeed = "deepspeed"


class GradCompression(StrEnum):
    none = "none"  # gradients cross the wire as the engine reduces them (fp32 here)
    bf16 = "bf16"  # cast to bf16 for the all-reduce and back to fp32: half the bytes


# the tree -----------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Ranges of the per-clip augmentation; every frame of a clip gets the same draw."""

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.0
    degrees: float = 15.0
    translate: float = 0.1  # fraction of the image side
    scale_min: float = 0.85
    scale_max: float = 1.15
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


@dataclass
class DataConfig:
    # a shard set (manifest.json) or a dataset folder (data.layout); or a list of shard sets, mixed step by
    # step by `train_weights` (`train_sources()` gives the list either way)
    train: Any = "demo/shards/train"
    train_weights: list[float] | None = None  # one per source of `train`; None: equal weights
    valid: str = "demo/shards/valid"  # a shard set or a dataset folder
    layout: Layout = Layout.auto  # a dataset folder's layout (auto: told by its folders)
    train_split: str | None = None  # a folder's split to train on (None: the layout's train split)
    valid_split: str | None = None  # a folder's split to validate on (None: the layout's valid split)
    clip_len: int = 8
    batch_size: int = 1  # clips per rank and step
    num_workers: int = 2
    order: Order = Order["global"]
    shuffle_shards: int = 8  # order=global: shards per shuffle window (their samples are shuffled together)
    shuffle_buffer: int = 64  # order=resample: samples in the shuffle buffer
    batches_per_epoch: int | None = None  # per rank; None: samples / (batch x ranks)
    on_error: OnError = OnError["raise"]
    # memory: keep the frozen image encoder's output per frame, so a frame seen again costs no encoder
    # pass (needs model.freeze.image_encoder and no augmentation but flips)
    feature_cache: FeatureCacheKind = FeatureCacheKind.none
    # host memory per rank; frames beyond it go to feature_cache_dir or are encoded every time
    feature_cache_gb: float = 8.0
    feature_cache_dtype: FeatureCacheDtype = FeatureCacheDtype.fp32  # the cached features' storage dtype
    # a node-local folder for the frames beyond feature_cache_gb (memory-mapped files, one folder per run and
    # rank, removed at the end); None: memory only
    feature_cache_dir: str | None = None
    feature_cache_disk_gb: float = 64.0  # disk per rank under feature_cache_dir; frames beyond are encoded
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def train_sources(self) -> list[str]:
        """The training sources `train` names: one path, or each of a list."""
        return [self.train] if isinstance(self.train, str) else list(self.train)


@dataclass
class PromptEncoderConfig:
    """`kind`: "features" (a light head over SAM2's FPN features, nearly free) or "cnn" (AutoSAM's own
    design: a separate CNN image encoder, `backbone` from torchvision with weights from a local file)."""

    kind: PromptKind = PromptKind.features
    hidden: int = 128
    num_sparse: int = 0
    backbone: PromptBackbone = PromptBackbone.resnet34
    backbone_weights: str | None = None


@dataclass
class FreezeConfig:
    """Which parts stay frozen (AutoSAM's default: all of SAM2; only the prompt encoder learns)."""

    image_encoder: bool = True
    mask_decoder: bool = True
    memory: bool = True
    prompt_encoder: bool = False


@dataclass
class ModelConfig:
    # unset (null): the size and release model.checkpoint holds, DEFAULT_VARIANT/RELEASE without one;
    # set: the checkpoint must hold them (autosam2.model.sam2_checkpoint settles both before a run)
    variant: Variant | None = None
    release: Release | None = None
    image_size: int = 1024
    # a SAM2 checkpoint in Meta's format (sam2.1_hiera_tiny.pt, ...: docs/training.md); None: random init
    checkpoint: str | None = None
    multimask_output: bool = False
    clip_mode: ClipMode = ClipMode.video
    # torch.compile of the image encoder (training and inference); a failed compile warns once and runs eager
    compile: bool = False
    compile_backend: str = "inductor"  # a torch.compile backend name (inductor | aot_eager | cudagraphs ...)
    # recompute the activations of the Hiera trunk's blocks, the memory-attention layers and the memory
    # encoder in the backward pass instead of keeping them (AutoSAM2.checkpoint_activations)
    activation_checkpointing: bool = False
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
    # layer-wise lr decay of the image encoder's trunk (AutoSAM2.layer_lr_scales; SAM2's recipe: 0.9);
    # 1.0: every parameter at lr
    layer_decay: float = 1.0


@dataclass
class LossWeights:
    """Weights of the loss terms (SAM2's own training: focal 20, dice 1, IoU 1, object score 1)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    presence: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 50
    max_steps: int | None = None  # optimizer steps; None: epochs x batches per epoch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.bf16
    engine: EngineKind = EngineKind.ddp
    deepspeed_config: str = "zero2"  # a DeepSpeed JSON file, or the name of one in DEEPSPEED_CONFIGS
    output_dir: str = "output"
    checkpoint_every: int = 500  # optimizer steps
    # the newest K complete checkpoints stay (best.pt, apart from them, is always kept)
    keep_checkpoints: int = 2
    # copy the state to host memory and write it on a background thread, so the step stalls only for the
    # copy (train.engine=ddp; DeepSpeed's save is a collective of its own and stays synchronous)
    checkpoint_async: bool = True
    validate_every: int = 500
    log_every: int = 10
    resume: str = "auto"  # auto: latest checkpoint in output_dir if any | none | a checkpoint folder
    # a weights file (another run's final.pt or best.pt) to start from: its weights only, the optimizer,
    # schedule and step start fresh (a curriculum's next stage); a checkpoint to resume from wins over it
    init_from: str | None = None
    # weights files (initial.pt, best.pt, final.pt) with the whole model; false: what the run trained, and
    # the SAM2 checkpoint (or the run's base.pt) they build on, named and hashed
    full_weights: bool = False
    max_bad_steps: int = 5  # non-finite losses in a row before the run aborts
    # the share of training steps whose clips take frame 0's ground-truth mask as its output in place of
    # its learned prompt's (SAM2's own training), so memory learns from a correct mask; video mode only
    cond_mask_prob: float = 0.0
    valid_sequences: int | None = None  # validate on the first N sequences only
    # a collective that waits longer than this fails the job (gloo and NCCL): a dead or hung rank
    # stops the others in bounded time instead of torch's 30-minute default
    dist_timeout_s: int = 600
    # a rank that gives no sign of life this long (its process stopped, its host cut off) ends the ranks
    # watching it (engine.dist.watchdog.PeerWatch), however long their collectives may wait
    peer_timeout_s: int = 60
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest convolution for the fixed input size
    tf32: bool = True  # TF32 matrix products and convolutions for fp32 work on Ampere and later GPUs
    # torch's CPU threads per rank; None: SLURM's --cpus-per-task, else OMP_NUM_THREADS, else the cores
    # over the ranks of this host (engine.dist.torch_threads), the same rule whatever the launcher
    threads: int | None = None
    # gradients on the wire between ranks: DDP's bf16 communication hook, DeepSpeed's
    # communication_data_type (docs/scale.md, Gradient communication)
    grad_compression: GradCompression = GradCompression.none
    # gradient bucket size in MiB of fp32 gradients: DDP's bucket_cap_mb, DeepSpeed's reduce_bucket_size
    # and allgather_bucket_size; None: each engine's own (DDP 25, the DeepSpeed JSON's); at most
    # MAX_BUCKET_MB. DeepSpeed allocates its reduce buckets whole (two with overlap_comm): a bucket past
    # the model's gradients costs that memory there
    bucket_mb: float | None = None
    # DeepSpeed ZeRO's overlap_comm (reduce buckets while backward runs); None: the DeepSpeed JSON's.
    # DDP always overlaps its bucketed all-reduce with backward: false is refused there
    overlap_comm: bool | None = None


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None each: MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, else the run's own record, else SQLite
    # mlflow.db beside the output directory and "autosam2" (autosam2.tracking.choice)
    uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None  # None: <variant>-<clip mode>-<output folder>
    system_metrics: bool = True
    # at the end of a run, how long to wait for records an outage held back (they stay in
    # OUT/tracking for `autosam2 sync OUT` after that); a run stopped by a signal waits at most 10 s
    flush_timeout_s: float = 60.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# reading ------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (a path, or a shipped config's name: `RUN_CONFIGS`), then ``key=value``
    overrides; refused with one ConfigError."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = RUN_CONFIGS.resolve(path)
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, UnicodeDecodeError) as err:  # not YAML at all
            raise ConfigError(f"{path}: not a YAML file ({str(err).splitlines()[0]})") from err
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(
                f"{path}: a config file holds a mapping of sections, not a {type(loaded).__name__}"
            )
        try:
            merged = OmegaConf.merge(merged, loaded)
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


def section_from_dict(kind: type, values: dict[str, Any], source: str) -> Any:
    """A config section (e.g. the ModelConfig a weights file carries) from plain values, checked like a
    config file: unknown keys and bad choices are one ConfigError naming `source`."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), values))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err


# shipped configs ----------------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parent / "configs"  # package data


@dataclass(frozen=True)
class Shipped:
    """The config files of one kind that the package ships: ``NAME<suffix>`` in ``SHIPPED/subfolder``.
    One is named by NAME, by its file name, or by ``configs/<subfolder>/`` and its file name (a spelling
    that resolves from any directory); a file at the path given wins over a shipped name."""

    what: str
    subfolder: str
    suffix: str

    @property
    def folder(self) -> Path:
        return SHIPPED / self.subfolder

    def names(self) -> list[str]:
        return sorted(path.stem for path in self.folder.glob(f"*{self.suffix}"))

    def resolve(self, ref: str | Path) -> Path:
        """The file `ref` names; one ConfigError naming `ref` and the shipped names when there is none."""
        path = Path(ref)
        if path.is_file():
            return path
        name = path.name.removesuffix(self.suffix)
        named = not path.is_absolute() and path.parent in (Path(), Path("configs", self.subfolder))
        if named and name in self.names():
            return self.folder / f"{name}{self.suffix}"
        found = "a folder, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"{ref}: {found}, nor a shipped {self.what} (shipped: {', '.join(self.names())})")


RUN_CONFIGS = Shipped("run config", "", ".yaml")
DEEPSPEED_CONFIGS = Shipped("DeepSpeed config", "deepspeed", ".json")


_BAD_CHOICE = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<choices>.*)\]")


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    choice = _BAD_CHOICE.match(message)
    if key and choice:  # an Enum field: say it the way `validate` says the rest
        options = choice["choices"].split(", ")
        allowed = " or ".join(options) if len(options) == 2 else f"one of {options}"
        return f"{key} must be {allowed}, got {choice['value']!r}"
    return f"{key}: {message}" if key else message


def validate(cfg: Config) -> None:
    """The rules types cannot state; one ConfigError listing every broken one."""
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(
        cfg.model.image_size % 32 == 0 and cfg.model.image_size >= 64,
        f"model.image_size must be a multiple of 32 and >= 64, got {cfg.model.image_size}",
    )
    need(
        cfg.data.clip_len >= 1 and cfg.data.batch_size >= 1 and cfg.data.shuffle_shards >= 1,
        "data.clip_len, data.batch_size and data.shuffle_shards must be >= 1",
    )
    need(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.train.device) is not None,
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
        and cfg.train.log_every >= 1
        and cfg.train.dist_timeout_s >= 1
        and cfg.train.peer_timeout_s >= 1
        and cfg.train.keep_checkpoints >= 1
        and (cfg.train.threads is None or cfg.train.threads >= 1)
        and (cfg.train.max_steps is None or cfg.train.max_steps >= 1),
        "train.epochs, checkpoint_every, keep_checkpoints, validate_every, log_every, dist_timeout_s, "
        "peer_timeout_s, threads and max_steps (null: epochs x batches) must be >= 1",
    )
    need(
        cfg.train.bucket_mb is None or 0 < cfg.train.bucket_mb <= MAX_BUCKET_MB,
        f"train.bucket_mb must be in (0, {MAX_BUCKET_MB}] (null: the engine's own), got {cfg.train.bucket_mb}",
    )
    need(
        cfg.train.overlap_comm is not False or cfg.train.engine == EngineKind.deepspeed,
        "train.overlap_comm=false needs train.engine=deepspeed: DDP always overlaps its bucketed "
        "all-reduce with backward",
    )
    need(
        0 < cfg.optim.layer_decay <= 1,
        f"optim.layer_decay must be in (0, 1] (1: off), got {cfg.optim.layer_decay}",
    )
    need(
        cfg.optim.layer_decay == 1 or not cfg.model.freeze.image_encoder,
        f"optim.layer_decay={cfg.optim.layer_decay} decays the image encoder's lr: it needs "
        "model.freeze.image_encoder=false",
    )
    problems += _train_problems(cfg.data)
    problems += _cond_mask_problems(cfg)
    problems += _feature_cache_problems(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _cond_mask_problems(cfg: Config) -> list[str]:
    prob = cfg.train.cond_mask_prob
    if not 0 <= prob <= 1:  # nan fails both
        return [f"train.cond_mask_prob must be in [0, 1], got {prob}"]
    if prob > 0 and (cfg.model.clip_mode != ClipMode.video or cfg.data.clip_len < 2):
        return [
            f"train.cond_mask_prob={prob} needs model.clip_mode=video and data.clip_len >= 2 (memory "
            "carries frame 0's mask to the frames after it)"
        ]
    return []


def _train_problems(data: DataConfig) -> list[str]:
    """data.train: a path or a list of paths; data.train_weights: a weight >= 0 for each, not all 0;
    sources are mixed in the global order only."""
    train = data.train
    if isinstance(train, str):
        paths = [train] if train else []
    else:
        paths = (
            list(train) if isinstance(train, list) and all(isinstance(t, str) and t for t in train) else []
        )
    if not paths:
        return [f"data.train must be a path or a list of paths, got {train!r}"]
    problems = []
    weights = data.train_weights
    if weights is not None and (len(weights) != len(paths) or min(weights) < 0 or sum(weights) <= 0):
        problems.append(
            f"data.train_weights must hold one weight >= 0 for each of the {len(paths)} source(s) of "
            f"data.train, not all 0, got {list(weights)}"
        )
    if len(paths) > 1 and data.order != Order["global"]:
        problems.append(f"a mix of data.train sources is drawn in data.order=global, got {data.order}")
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        problems.append(
            f"data.train names {', '.join(twice)} more than once; give one source a larger data.train_weights"
        )
    return problems


def _feature_cache_problems(cfg: Config) -> list[str]:
    """data.feature_cache=memory keeps the frozen image encoder's output per frame: it needs a frozen
    encoder and frames that reach it unchanged but for flips."""
    if cfg.data.feature_cache != FeatureCacheKind.memory:
        if cfg.data.feature_cache_dir is not None:
            return [
                "data.feature_cache_dir holds the feature cache's disk tier: it needs data.feature_cache=memory"
            ]
        return []
    problems = []
    if not cfg.model.freeze.image_encoder:
        problems.append(
            "data.feature_cache=memory keeps the frozen image encoder's output: it needs "
            "model.freeze.image_encoder=true"
        )
    aug = cfg.data.augment
    changed = {
        "degrees": aug.degrees,
        "translate": aug.translate,
        "brightness": aug.brightness,
        "contrast": aug.contrast,
        "saturation": aug.saturation,
    }
    changed = {k: v for k, v in changed.items() if v != 0}
    if aug.scale_min != 1 or aug.scale_max != 1:
        changed |= {"scale_min": aug.scale_min, "scale_max": aug.scale_max}
    if aug.enabled and changed:
        problems.append(
            "data.feature_cache=memory needs frames that reach the encoder unchanged but for flips: set "
            + ", ".join(
                f"data.augment.{k}={1 if k.startswith('scale') else 0} (got {v})" for k, v in changed.items()
            )
            + " or data.augment.enabled=false"
        )
    gb, disk_gb = cfg.data.feature_cache_gb, cfg.data.feature_cache_disk_gb
    if not (0 <= gb < math.inf and 0 <= disk_gb < math.inf):  # nan fails every comparison
        problems.append(
            f"data.feature_cache_gb and data.feature_cache_disk_gb must be >= 0 and finite, got {gb} and {disk_gb}"
        )
    if cfg.data.feature_cache_dir == "":
        problems.append("data.feature_cache_dir must be a folder's path or null (memory only)")
    return problems


# writing ------------------------------------------------------------------------------------------------


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(section: Any) -> dict[str, Any]:
    """Plain values (choices as strings) of the tree or of one section: for MLflow params, weights files."""
    if not is_dataclass(section):
        raise TypeError(f"expected a config dataclass, got {type(section).__name__}")
    return OmegaConf.to_container(OmegaConf.structured(section), resolve=True, enum_to_str=True)
