"""Training engines behind one small interface, so the loop never branches on which one runs.

`ddp`: torch DistributedDataParallel (gloo on CPU, NCCL on GPU), AdamW, our own clipping, accumulation
and bf16 autocast. `deepspeed`: ZeRO (stage from the JSON config), accumulation and clipping, and bf16
through DeepSpeed's `torch_autocast`. This is the only module that imports deepspeed. Each engine is given
the optimizer section of the config and the few facts it needs; `build_engine` reads them off the tree.

bf16 is autocast in both engines, with fp32 weights: SAM2 mixes dtypes on purpose (its FPN neck and
memory attention compute in fp32), so a model cast to bf16, as DeepSpeed's `bf16` mode does, fails
in its first forward.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autosam2.config import (
    DEEPSPEED_CONFIGS,
    ClipMode,
    Config,
    ConfigError,
    EngineKind,
    GradCompression,
    OptimConfig,
    Precision,
    TrainConfig,
)
from autosam2.engine.dist import DistInfo, barrier
from autosam2.errors import CheckpointError
from autosam2.model.autosam2 import AutoSAM2, ClipOutput
from autosam2.model.weights import load_trainable, trainable_state


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, embeddings and positional parameters. `layer_decay` < 1:
    the image encoder's layers in groups of their own, each with its `lr_scale` (`AutoSAM2.layer_lr_scales`;
    `with_lr` sets their lr); the groups at the full lr come first."""
    scales = model.layer_lr_scales(layer_decay) if layer_decay < 1 else {}
    sorted_: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        skip = (
            p.ndim < 2
            or lowered.endswith(".bias")
            or any(k in lowered for k in ("norm", "pos", "embed", "token"))
        )
        sorted_.setdefault((scales.get(name, 1.0), skip), []).append(p)
    groups = []
    for (scale, skip), params in sorted(sorted_.items(), key=lambda item: (-item[0][0], item[0][1])):
        group = {"params": params, "weight_decay": 0.0 if skip else weight_decay}
        groups.append(group if scale == 1 else {**group, "lr_scale": scale})
    return groups


def with_lr(groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """`groups` with the lr of each that has an `lr_scale` set to lr x its scale (the others take the
    optimizer's lr)."""
    return [{**g, "lr": lr * g["lr_scale"]} if "lr_scale" in g else g for g in groups]


@dataclass
class LRSchedule:
    """The learning-rate factor after each optimizer step: linear warm-up over `warmup` steps, then a
    cosine down to `min_ratio` of the peak at step `total`. `anchor` (step, progress): the cosine of a
    run resumed with another length goes on from where it stood at that step, reaching its end at the
    new `total` without a jump. A callable object, not a closure: LambdaLR keeps its fields in the
    scheduler's state, so a checkpoint holds the schedule it was trained under."""

    warmup: int
    total: int
    min_ratio: float
    anchor: tuple[int, float] | None = None

    @classmethod
    def of(cls, optim: OptimConfig, total_steps: int) -> LRSchedule:
        return cls(optim.warmup_steps, total_steps, optim.min_lr_ratio)

    def progress(self, step: int) -> float:
        """How far along the cosine `step` is: 0 up to the end of warm-up, 1 at `total` and after."""
        start, at = self.anchor or (self.warmup, 0.0)
        if step < start:
            return min(1.0, max(0.0, (step - self.warmup) / max(1, self.total - self.warmup)))
        return min(1.0, at + (1.0 - at) * (step - start) / max(1, self.total - start))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        return self.min_ratio + (1 - self.min_ratio) * cosine

    def stretched(self, total: int, step: int) -> LRSchedule:
        """This schedule ending at `total` instead, from `step` on, with no jump at `step`."""
        if step < self.warmup:  # the cosine has not begun: it simply spans the new length
            return LRSchedule(self.warmup, total, self.min_ratio, self.anchor)
        return LRSchedule(self.warmup, total, self.min_ratio, (step, self.progress(step)))


class Engine(ABC):
    """forward -> backward -> step; `step` acts on accumulation boundaries and returns the grad norm.
    `optimizer` and `scheduler` (a LambdaLR over an `LRSchedule`) are what a checkpoint restores."""

    module: AutoSAM2
    grad_accum: int
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @abstractmethod
    def forward(
        self,
        images_TBCHW: torch.Tensor,
        per_frame: bool,
        image_features: dict[str, Any] | None = None,
        cond_mask_BHW: torch.Tensor | None = None,
    ) -> ClipOutput:
        """The clip through the wrapped model; `image_features`: the frozen encoder's output, if known;
        `cond_mask_BHW`: frame 0's ground truth as its output (`AutoSAM2.forward_clip`)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float: ...

    @abstractmethod
    def zero_grad(self) -> None: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Called on every rank; writes model, optimizer and scheduler state into `folder`."""

    @abstractmethod
    def load(self, folder: Path) -> None: ...

    def retune(self, optim: OptimConfig, schedule: LRSchedule) -> None:
        """`optim`'s peak lr, weight decay and betas and `schedule` in place of those a checkpoint restored,
        from the scheduler's current step on: the schedule keeps its position, at the new peak."""
        groups = self.optimizer.param_groups
        built = param_groups(self.module, optim.weight_decay, optim.layer_decay)
        for group, fresh in zip(groups, built, strict=True):  # the order they were built in
            peak = optim.lr * fresh.get("lr_scale", 1.0)
            group.update(initial_lr=peak, weight_decay=fresh["weight_decay"], betas=tuple(optim.betas))
            group["lr"] = peak * schedule(self.scheduler.last_epoch)  # what the next step uses
        self.scheduler.lr_lambdas = [schedule] * len(groups)
        self.scheduler.base_lrs = [group["initial_lr"] for group in groups]

    def snapshot(self) -> Callable[[Path], None] | None:
        """For an asynchronous checkpoint: this rank's state copied to host memory now, returned as the
        write that puts it into a folder later (on another thread, while training goes on); None when
        the engine cannot save that way (its save is a collective), so the checkpoint is synchronous."""
        return None


def _extras(image_features: dict[str, Any] | None, cond_mask_BHW: torch.Tensor | None) -> dict[str, Any]:
    """The forward's keywords for known encoder features and a conditioning mask: only those given."""
    given = {"image_features": image_features, "cond_mask_BHW": cond_mask_BHW}
    return {key: value for key, value in given.items() if value is not None}


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON (a path, or a shipped config's name: `DEEPSPEED_CONFIGS`) as a dict; one
    ConfigError naming the file when there is none, it cannot be read or casts the model (SAM2 does not
    run cast to bf16/fp16: train.precision=bf16 autocasts instead)."""
    path = DEEPSPEED_CONFIGS.resolve(path)
    try:
        ds_config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({err})") from err
    if not isinstance(ds_config, dict):
        raise ConfigError(f"{path}: the DeepSpeed config must be a JSON object")
    for key in ("bf16", "fp16"):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            raise ConfigError(
                f"{path}: {key!r} casts SAM2 to {key}, which it does not run in; remove it and "
                "set train.precision=bf16 (autocast) instead"
            )
    return ds_config


def use_autocast(precision: Precision, device: torch.device) -> bool:
    """bf16 autocast where the config asks for it and the device is a GPU; CPU runs stay fp32."""
    return device.type == "cuda" and precision == Precision.bf16


def with_comm_settings(ds_config: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    """`ds_config` with train.grad_compression, bucket_mb and overlap_comm merged in (a copy; a setting
    left at its default leaves the JSON's own). DeepSpeed counts its buckets in elements: fp32 ones."""
    ds_config = {**ds_config, "zero_optimization": dict(ds_config.get("zero_optimization", {}))}
    zero = ds_config["zero_optimization"]
    if train.grad_compression == GradCompression.bf16:
        ds_config["communication_data_type"] = "bf16"
    if train.bucket_mb is not None:
        elements = int(train.bucket_mb * 2**20 / 4)
        zero.update(reduce_bucket_size=elements, allgather_bucket_size=elements)
    if train.overlap_comm is not None:
        zero["overlap_comm"] = train.overlap_comm
    return ds_config


class DDPEngine(Engine):
    """``find_unused``: some trainable parameters take no part in a step (DDP must be told).
    ``grad_compression``: bf16 registers torch's bf16 communication hook (gradients averaged in bf16, then
    cast back into the fp32 buckets); ``bucket_mb``: DDP's bucket_cap_mb (None: torch's 25)."""

    def __init__(
        self,
        model: AutoSAM2,
        optim: OptimConfig,
        total_steps: int,
        info: DistInfo,
        autocast: bool = False,
        find_unused: bool = False,
        grad_compression: GradCompression = GradCompression.none,
        bucket_mb: float | None = None,
    ):
        self.module = model
        self.info = info
        self.grad_accum = optim.grad_accum
        self.grad_clip = optim.grad_clip
        self.autocast = autocast
        self.wrapped: nn.Module = model
        if torch.distributed.is_initialized():  # a group of one too: the reducer runs as in a job
            ids = [info.device.index] if info.device.type == "cuda" else None
            bucket = {} if bucket_mb is None else {"bucket_cap_mb": bucket_mb}
            self.wrapped = DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused, **bucket
            )
            if grad_compression == GradCompression.bf16:
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

                self.wrapped.register_comm_hook(None, bf16_compress_hook)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            with_lr(param_groups(model, optim.weight_decay, optim.layer_decay), optim.lr),
            lr=optim.lr,
            betas=tuple(optim.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule.of(optim, total_steps))
        self.micro = 0

    def forward(
        self,
        images_TBCHW: torch.Tensor,
        per_frame: bool,
        image_features: dict[str, Any] | None = None,
        cond_mask_BHW: torch.Tensor | None = None,
    ) -> ClipOutput:
        if self.wrapped is not self.module:
            # what DDP's no_sync() does, as a flag: gradients are all-reduced on the last micro-step only
            self.wrapped.require_backward_grad_sync = (self.micro + 1) % self.grad_accum == 0
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return ClipOutput(
                *self.wrapped(images_TBCHW, per_frame, **_extras(image_features, cond_mask_BHW))
            )

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        self.micro += 1

    def step(self) -> float | None:
        if self.micro % self.grad_accum:
            return None
        norm = torch.nn.utils.clip_grad_norm_(
            self.trainable, self.grad_clip if self.grad_clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()
        return float(norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _state(self, copy: bool = False) -> dict[str, Any]:
        """What engine.pt holds; `copy`: nothing in it shared with the live optimizer and scheduler (their
        state_dicts hold the moment tensors that the next step changes in place)."""
        live = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return {
            "model": trainable_state(self.module),
            **(host_copy(live) if copy else live),
            "micro": self.micro,
        }

    def save(self, folder: Path) -> None:
        if self.info.is_main:
            _write_engine_file(folder, self._state())

    def snapshot(self) -> Callable[[Path], None]:
        state = self._state(copy=True) if self.info.is_main else None
        return lambda folder: _write_engine_file(folder, state) if state is not None else None

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "engine.pt", map_location="cpu", weights_only=True)
        load_trainable(self.module, state["model"], folder / "engine.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


def _write_engine_file(folder: Path, state: dict[str, Any]) -> None:
    with open(folder / "engine.pt", "wb") as f:  # a file object: a full disk says so
        torch.save(state, f)


def host_copy(tree: Any) -> Any:
    """`tree` (dicts, lists, tuples of tensors and plain values) with every tensor copied to host memory:
    a snapshot that later steps cannot change."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: host_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(value) for value in tree)
    return tree


def require_deepspeed() -> None:
    """Nothing when DeepSpeed is installed; else the one line naming the extra that installs it."""
    from autosam2.extras import require

    require("deepspeed", f"train.engine={EngineKind.deepspeed}")


class DeepSpeedEngine(Engine):
    """``ds_config``: the DeepSpeed JSON as read by `read_deepspeed_config`; ``micro_batch``: clips per rank
    and step (DeepSpeed checks its batch arithmetic)."""

    def __init__(
        self,
        model: AutoSAM2,
        optim: OptimConfig,
        total_steps: int,
        info: DistInfo,
        ds_config: dict[str, Any],
        micro_batch: int,
        autocast: bool = False,
    ):
        require_deepspeed()
        import deepspeed

        self.module = model
        self.info = info
        self.grad_accum = optim.grad_accum
        ds_config = dict(ds_config)
        ds_config.update(
            train_micro_batch_size_per_gpu=micro_batch,
            gradient_accumulation_steps=optim.grad_accum,
            gradient_clipping=optim.grad_clip,
        )
        ds_config["train_batch_size"] = micro_batch * optim.grad_accum * info.world_size
        # fp32 weights and master copy, bf16 compute; Linear/Conv gradients are reduced in bf16
        ds_config["torch_autocast"] = {"enabled": autocast, "dtype": "bfloat16"}
        # torch's AdamW: no fused CUDA kernel to build; our parameter groups carry the decay rule
        ds_config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=with_lr(param_groups(model, optim.weight_decay, optim.layer_decay), optim.lr),
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, LRSchedule.of(optim, total_steps)
            ),
        )

    def forward(
        self,
        images_TBCHW: torch.Tensor,
        per_frame: bool,
        image_features: dict[str, Any] | None = None,
        cond_mask_BHW: torch.Tensor | None = None,
    ) -> ClipOutput:
        return ClipOutput(*self.engine(images_TBCHW, per_frame, **_extras(image_features, cond_mask_BHW)))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, folder: Path) -> None:
        try:
            # frozen parameters are what the model was built with, the same at every step: left out
            self.engine.save_checkpoint(
                str(folder), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True
            )
        except (OSError, RuntimeError):
            # writes come after DeepSpeed's last collective but one: meet the other ranks at its
            # closing barrier, so the failure is agreed on instead of hanging them
            barrier()
            raise

    def load(self, folder: Path) -> None:
        # ZeRO splits the optimizer state into one file per rank, and DeepSpeed reloads it only at the
        # world size that wrote it (its universal format, made by a separate conversion, aside)
        parts = len(list((folder / "deepspeed").glob("*zero_pp_rank_*optim_states.pt")))
        if parts and parts != self.info.world_size:
            raise CheckpointError(
                f"{folder / 'deepspeed'}: a DeepSpeed ZeRO checkpoint written by {parts} ranks cannot be "
                f"resumed by {self.info.world_size}: ZeRO splits the optimizer state by rank. Resume with "
                f"{parts} ranks (nodes x tasks per node), or use train.engine=ddp, whose checkpoints "
                "resume at any world size"
            )
        # not strict: the frozen parameters are not in it (those of older checkpoints load as well)
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint in it")


def build_engine(
    model: AutoSAM2, cfg: Config, total_steps: int, info: DistInfo, autocast: bool | None = None
) -> Engine:
    """The engine `cfg.train.engine` names, given its part of the config. ``autocast``: bf16 autocast on
    or off; default: as ``use_autocast`` decides."""
    if autocast is None:
        autocast = use_autocast(cfg.train.precision, info.device)
    if cfg.train.engine == EngineKind.deepspeed:
        ds_config = with_comm_settings(read_deepspeed_config(Path(cfg.train.deepspeed_config)), cfg.train)
        if autocast and cfg.train.grad_compression == GradCompression.bf16 and info.is_main:
            print(
                "train.grad_compression=bf16: under bf16 autocast DeepSpeed picks each gradient's wire dtype "
                "itself (bf16 for Linear and Conv weights, fp32 for the rest) and does not read "
                "communication_data_type",
                flush=True,
            )
        return DeepSpeedEngine(
            model, cfg.optim, total_steps, info, ds_config, cfg.data.batch_size, autocast=autocast
        )
    # trainable memory modules sit unused when every frame is a conditioning frame, and in a mix's steps
    # of one-frame clips
    mixed = len(cfg.data.train_sources()) > 1
    unused = (cfg.model.clip_mode == ClipMode.frame or mixed) and not cfg.model.freeze.memory
    return DDPEngine(
        model,
        cfg.optim,
        total_steps,
        info,
        autocast=autocast,
        find_unused=unused,
        grad_compression=cfg.train.grad_compression,
        bucket_mb=cfg.train.bucket_mb,
    )
