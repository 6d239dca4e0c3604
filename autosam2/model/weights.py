"""Trained weights: the file format `autosam2 train` writes and `autosam2 evaluate` reads, and the files
of a run (``initial.pt`` before the first step, ``best.pt`` at the best valid Dice, ``final.pt``, and the
``base.pt`` they may build on).

A weights file is ``{"format", "version", "full", "model_config", "model", "base", "extra"}``, loadable
with ``weights_only=True``. ``model`` holds what the run trained (the parameters that train and the
buffers of their modules) and all of our prompt encoder, which no SAM2 checkpoint holds. ``base`` names
the file, in SAM2's own format (``{"model": state_dict}``), that holds everything else: its absolute path,
its path relative to the weights file's folder (where it is looked for first, so a moved run folder still
loads), its size in bytes and the sha256 of its whole content, which must match. A run built from a SAM2
checkpoint names that checkpoint; any other run (random init, or started from another run's weights
through ``train.init_from``) writes its SAM2 weights once, as ``base.pt`` beside its weights files, and
names it (in SAM2's format, it also serves as ``--checkpoint``). ``full`` (``train.full_weights``): the
whole state, no base. Version 1 files (the whole state, or the trained parameters on top of the
checkpoint given when loading) still load. ``extra``: metadata (step, metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosam2.atomic import atomic_file
from autosam2.config import ModelConfig, section_from_dict, to_dict
from autosam2.engine.run_lock import guard
from autosam2.errors import CheckpointError, write_failure
from autosam2.model.sam2_builder import build_autosam2, load_sam2_checkpoint, save_sam2_checkpoint
from autosam2.model.sam2_checkpoint import OWN_MODULES, read_sam2_checkpoint, settle_model, sniff

WEIGHTS_FORMAT = "autosam2-weights"
VERSION = 2
BASE_FILE = "base.pt"


class NonFiniteWeights(CheckpointError):
    """Trained weights holding NaN or infinity: never written as a checkpoint or weights file."""


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, by state_dict name (the live tensors, detached): the parameters that train
    and the persistent buffers of the modules they belong to (a BatchNorm's running statistics)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        own = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        dot = f"{prefix}." if prefix else ""
        names.update(dot + name for name in own)
        names.update(
            dot + name
            for name, buffer in module.named_buffers(recurse=False)
            if buffer is not None and name not in module._non_persistent_buffers_set
        )
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if k in names}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of `trained_tensors`, on the CPU."""
    return {name: tensor.cpu().clone() for name, tensor in trained_tensors(model).items()}


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """None when every floating-point value is finite; else how many are not, of how many, and in which
    tensors (the first three named)."""
    total, bad = 0, {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        total += tensor.numel()
        count = tensor.numel() - int(torch.isfinite(tensor).sum())
        if count:
            bad[name] = count
    if not bad:
        return None
    names = list(bad)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{sum(bad.values()):,} of {total:,} values are not finite (in {shown})"


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load a {name: tensor} subset strictly: every key must be a parameter or buffer of the model."""
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise CheckpointError(f"{source}: keys not in this model: {unknown[:10]}")
    model.load_state_dict(state, strict=False)


@dataclasses.dataclass(frozen=True)
class Base:
    """A file of SAM2 weights, in SAM2's format, that weights files build on: where it is, its size in
    bytes, and the sha256 of its whole content."""

    path: Path
    size: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> Base:
        path = Path(path).resolve()
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return cls(path, path.stat().st_size, digest)

    def record(self, weights: Path) -> dict[str, Any]:
        """How the weights file at `weights` names this base."""
        relative = os.path.relpath(self.path, Path(weights).resolve().parent)
        return {"path": str(self.path), "relative": relative, "bytes": self.size, "sha256": self.sha256}

    def matches(self, record: dict[str, Any]) -> bool:
        return self.size == record["bytes"] and self.sha256 == record["sha256"]


def find_base(weights: Path, record: dict[str, Any], given: str | Path | None = None) -> Path:
    """The file the base `record` of `weights` names: `given` (``--checkpoint``) when it is that file,
    else the one at the recorded path relative to the weights file, else at its absolute path. One
    CheckpointError when none is that file."""
    weights = Path(weights)
    wanted = f"{record['bytes']:,} bytes, sha256 {record['sha256'][:16]}"
    candidates = (
        [Path(given)] if given is not None else [weights.parent / record["relative"], Path(record["path"])]
    )
    differ = []
    for candidate in dict.fromkeys(candidates):
        if not candidate.is_file():
            continue
        if candidate.stat().st_size == record["bytes"] and Base.of(candidate).matches(record):
            return candidate
        differ.append(str(candidate))
    if given is not None:
        # a file that is no SAM2 checkpoint says what it is; one that is, what it holds
        found = f"is another file, holding {read_sam2_checkpoint(given).holds}" if differ else "is not a file"
        raise CheckpointError(
            f"{given}: {found}, not the SAM2 weights {weights} was trained on ({record['path']}: {wanted})"
        )
    where = f"{', '.join(differ)} differs" if differ else "is not there, nor beside the weights file"
    raise CheckpointError(
        f"{weights}: holds what was trained on top of {record['path']} ({wanted}), which {where}; pass "
        "--checkpoint PATH to that file"
    )


def save_weights(
    path: str | Path,
    model: nn.Module,
    model_config: ModelConfig,
    base: Base | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a weights file atomically: what `model` trained on top of `base` (None: its whole state).
    Trained weights that are not finite are refused (NonFiniteWeights); a failed write (a full disk) is
    one CheckpointError naming the file."""
    path = Path(path)
    trained = trained_tensors(model)
    problem = nonfinite(trained)
    if problem:
        raise NonFiniteWeights(f"{path}: not written: its trained weights are not finite: {problem}")
    state = model.state_dict()
    if base is not None:
        state = {k: v for k, v in state.items() if k in trained or k.startswith(OWN_MODULES)}
    if model_config.variant is None or model_config.release is None:
        model_config = settle_model(model_config)  # the file records the size and release built
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": VERSION,
        "full": base is None,
        "model_config": to_dict(model_config),
        "model": {
            k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()
        },
        "base": None if base is None else base.record(path),
        "extra": extra or {},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            torch.save(payload, f)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {write_failure(err, path)} writing weights") from err


def read_weights(path: str | Path) -> dict[str, Any]:
    """The payload of a weights file; one CheckpointError naming it when it is missing or foreign."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a weights file")
    try:  # memory-mapped where torch allows it (its zip format): the tensors' data stay on disk
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: weights file not found") from err
    except Exception as err:  # a damaged or foreign file: torch.load raises many types
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        why = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise CheckpointError(
            f"{path}: not a loadable weights file: {sniff(path)}, which torch.load cannot read ({why})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: not an AutoSAM2 weights file (written by `autosam2 train`)")
    return payload


def _base_file(weights: Path, payload: dict[str, Any], checkpoint: str | Path | None) -> Path | None:
    """The SAM2 weights file the model of `weights` is rebuilt on (None: the file holds every weight; a
    `checkpoint` given all the same must be a SAM2 checkpoint)."""
    if payload["full"]:
        if checkpoint is not None:
            read_sam2_checkpoint(checkpoint)
        return None
    if payload.get("base") is not None:
        return find_base(weights, payload["base"], checkpoint)
    if checkpoint is None:  # version 1: the trained parameters on top of the checkpoint given
        raise CheckpointError(
            f"{weights}: holds the trained parts only; pass --checkpoint "
            f"{payload['model_config'].get('checkpoint')} (the SAM2 it was trained from)"
        )
    return Path(checkpoint)


def model_files(
    weights: str | Path, checkpoint: str | Path | None
) -> tuple[dict[str, Any], ModelConfig, Path | None]:
    """What `load_trained_model` builds from, each checked before any model is built: the payload of a
    weights file, its model config, and the SAM2 weights file it is rebuilt on (None: it holds every
    weight); one CheckpointError or ConfigError naming the file that is wrong."""
    weights = Path(weights)
    payload = read_weights(weights)
    cfg = section_from_dict(ModelConfig, payload["model_config"], f"{weights}: model_config")
    return payload, cfg, _base_file(weights, payload, checkpoint)


def load_trained_model(
    weights: str | Path, checkpoint: str | Path | None, device: torch.device, compile: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model, in eval mode, from a weights file and the SAM2 weights it names (found
    beside it or where it was written; `checkpoint`, ``--checkpoint``, says where, and must be that
    file); ``compile``: torch.compile its image encoder (whether training compiled is not carried over)."""
    payload, cfg, base = model_files(weights, checkpoint)
    # the prompt backbone's own weights are in the file: its local source need not exist here
    prompt = dataclasses.replace(cfg.prompt, backbone_weights=None)
    checkpoint = None if base is None else str(base)
    model = build_autosam2(dataclasses.replace(cfg, checkpoint=checkpoint, prompt=prompt, compile=compile))
    load_trainable(model, payload["model"], weights)
    return model.to(device).eval(), payload


def init_from_weights(model: nn.Module, path: str | Path, model_config: ModelConfig) -> dict[str, Any]:
    """Load a weights file into a freshly built model, its base included (the next stage of a curriculum
    starting where the last one ended); one CheckpointError naming the file when its model is not this
    one. The file's metadata (``extra``: step, metrics) is returned."""
    path = Path(path)
    payload = read_weights(path)
    theirs = section_from_dict(ModelConfig, payload["model_config"], f"{path}: model_config")
    model_config = settle_model(model_config)
    different = [  # a value the file does not record (null) is not compared
        f"{key} {getattr(theirs, key)} (this run: {getattr(model_config, key)})"
        for key in ("variant", "release", "image_size")
        if getattr(theirs, key) not in (getattr(model_config, key), None)
    ]
    if theirs.prompt != model_config.prompt:
        different.append(f"model.prompt {to_dict(theirs.prompt)} (this run: {to_dict(model_config.prompt)})")
    if different:
        raise CheckpointError(f"{path}: trained another model: {'; '.join(different)}")
    if not payload["full"] and payload.get("base") is not None:
        load_sam2_checkpoint(model, find_base(path, payload["base"]))
    elif not payload["full"] and model_config.checkpoint is None:
        raise CheckpointError(
            f"{path}: holds the trained parts only, and this run starts SAM2 from random weights; set "
            f"model.checkpoint={theirs.checkpoint} (the SAM2 it was trained from)"
        )
    load_trainable(model, payload["model"], path)
    return payload["extra"]


class RunWeights:
    """The weights files of one run, written by rank 0 only: ``initial.pt``, ``best.pt``, ``final.pt``,
    each what the run trained on top of its base: the SAM2 checkpoint the model was built from, or, where
    none holds the model's SAM2 weights (random init, or `init_from` another run's weights), ``base.pt``,
    those weights written once beside the files. `full`: every file holds the whole state instead."""

    def __init__(
        self,
        out: Path,
        model: nn.Module,
        model_config: ModelConfig,
        is_main: bool,
        full: bool = False,
        init_from: str | None = None,
    ):
        self.out, self.model, self.model_config, self.is_main = Path(out), model, model_config, is_main
        self.full = full
        own = model_config.checkpoint is None or init_from is not None
        self.base_file = self.out / BASE_FILE if own and not full else None
        self._base: Base | None = None

    def begin(self) -> Path:
        """Before the first step: the run's base (written anew when it is ``base.pt``) and ``initial.pt``."""
        if self.is_main and self.base_file is not None:
            self._base = self._write_base()
        return self.save("initial.pt", 0)

    def save(self, name: str, step: int, extra: dict[str, Any] | None = None) -> Path:
        path = self.out / name
        if self.is_main:
            guard(name)  # a rank whose run no longer holds the output directory leaves instead
            base = None if self.full else self.base()
            save_weights(path, self.model, self.model_config, base, {"step": step, **(extra or {})})
        return path

    def base(self) -> Base:
        """What the files build on: the SAM2 checkpoint, or ``base.pt`` (written now when missing: its
        frozen parts are the same at any step, and each file holds the trained ones)."""
        if self._base is None:
            if self.base_file is None:
                self._base = Base.of(self.model_config.checkpoint)
            elif self.base_file.is_file():
                self._base = Base.of(self.base_file)
            else:
                self._base = self._write_base()
        return self._base

    def _write_base(self) -> Base:
        path = self.base_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_sam2_checkpoint(self.model, path)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"{path}: {write_failure(err, path)} writing the base weights") from err
        return Base.of(path)
