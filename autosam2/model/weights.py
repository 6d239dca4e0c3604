"""Trained weights: the file format `autosam2 train` writes and `autosam2 evaluate` reads, and the three
files of a run (``initial.pt`` before the first step, ``best.pt`` at the best valid Dice, ``final.pt``).

A weights file is ``{"format", "version", "full", "model_config", "model", "extra"}``, loadable with
``weights_only=True``: the trainable parameters (all of the state when SAM2 was randomly initialised, since
no checkpoint can rebuild those), the model config that rebuilds the model, and metadata (step, metrics).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosam2.atomic import atomic_file
from autosam2.config import ModelConfig, section_from_dict, to_dict
from autosam2.errors import CheckpointError, write_failure
from autosam2.model.sam2_builder import build_autosam2

WEIGHTS_FORMAT = "autosam2-weights"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train, on the CPU, by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load a {name: tensor} subset strictly: every key must be a parameter or buffer of the model."""
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise CheckpointError(f"{source}: keys not in this model: {unknown[:10]}")
    model.load_state_dict(state, strict=False)


def save_weights(
    path: str | Path,
    model: nn.Module,
    model_config: ModelConfig,
    full: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a weights file atomically; a failed write (a full disk) is one CheckpointError naming it."""
    path = Path(path)
    named = model.state_dict() if full else {n: p for n, p in model.named_parameters() if p.requires_grad}
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": 1,
        "full": full,
        "model_config": to_dict(model_config),
        "model": {
            k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in named.items()
        },
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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: weights file not found") from err
    except Exception as err:  # a damaged or foreign file: torch.load raises many types
        raise CheckpointError(f"{path}: not a loadable weights file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: not an AutoSAM2 weights file (written by `autosam2 train`)")
    return payload


def load_trained_model(
    weights: str | Path, checkpoint: str | Path | None, device: torch.device, compile: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model, in eval mode, from a weights file and the SAM2 checkpoint it was
    trained from (None for a random-init run, whose file holds every weight); ``compile``: torch.compile
    its image encoder (whether training compiled is not carried over)."""
    payload = read_weights(weights)
    cfg = section_from_dict(ModelConfig, payload["model_config"], f"{weights}: model_config")
    if not payload["full"] and checkpoint is None and cfg.checkpoint:
        raise CheckpointError(
            f"{weights}: holds the trained parts only; pass --checkpoint {cfg.checkpoint} (the SAM2 it was trained from)"
        )
    # the prompt backbone's own weights are in the file: its local source need not exist here
    prompt = dataclasses.replace(cfg.prompt, backbone_weights=None)
    model = build_autosam2(dataclasses.replace(cfg, checkpoint=checkpoint, prompt=prompt, compile=compile))
    load_trainable(model, payload["model"], weights)
    return model.to(device).eval(), payload


def init_from_weights(model: nn.Module, path: str | Path, model_config: ModelConfig) -> dict[str, Any]:
    """Load a weights file into a freshly built model (the next stage of a curriculum starting where the
    last one ended); one CheckpointError naming the file when its model is not this one. The file's
    metadata (``extra``: step, metrics) is returned."""
    payload = read_weights(path)
    theirs = section_from_dict(ModelConfig, payload["model_config"], f"{path}: model_config")
    different = [
        f"{key} {getattr(theirs, key)} (this run: {getattr(model_config, key)})"
        for key in ("variant", "image_size")
        if getattr(theirs, key) != getattr(model_config, key)
    ]
    if theirs.prompt != model_config.prompt:
        different.append(f"model.prompt {to_dict(theirs.prompt)} (this run: {to_dict(model_config.prompt)})")
    if different:
        raise CheckpointError(f"{path}: trained another model: {'; '.join(different)}")
    if not payload["full"] and model_config.checkpoint is None:
        raise CheckpointError(
            f"{path}: holds the trained parts only, and this run starts SAM2 from random weights; set "
            f"model.checkpoint={theirs.checkpoint} (the SAM2 it was trained from)"
        )
    load_trainable(model, payload["model"], path)
    return payload["extra"]


class RunWeights:
    """The weights files of one run, written by rank 0 only: ``initial.pt``, ``best.pt``, ``final.pt``."""

    def __init__(self, out: Path, model: nn.Module, model_config: ModelConfig, is_main: bool):
        self.out, self.model, self.model_config, self.is_main = Path(out), model, model_config, is_main
        self.full = model_config.checkpoint is None  # random-init SAM2: no checkpoint rebuilds the rest

    def save(self, name: str, step: int, extra: dict[str, Any] | None = None) -> Path:
        path = self.out / name
        if self.is_main:
            save_weights(path, self.model, self.model_config, self.full, {"step": step, **(extra or {})})
        return path
