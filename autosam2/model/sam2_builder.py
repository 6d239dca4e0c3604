"""Build SAM2 (as our AutoSAM2 subclass) from sam2's config of a size and release, load Meta's checkpoints
strictly, and `build_autosam2`: the one factory of the model a run trains (SAM2, its learned prompt
encoder, frozen parts)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from sam2.build_sam import build_sam2

from autosam2.atomic import atomic_file
from autosam2.config import ModelConfig, Release, Variant
from autosam2.errors import CheckpointError
from autosam2.model.sam2_checkpoint import OWN_MODULES, Sam2File, read_sam2_checkpoint, settle

# sam2's config of each (release, size): configs/sam2.1/sam2.1_hiera_t.yaml, configs/sam2/sam2_hiera_t.yaml
CONFIGS = {(r, v): f"configs/{r}/{r}_{v}.yaml" for r in Release for v in Variant}
MODEL_CLASS = "autosam2.model.autosam2.AutoSAM2"


def sam2_overrides(image_size: int, multimask_output: bool = False) -> list[str]:
    """Hydra overrides: our subclass, the image size (and the memory attention's RoPE grid to match),
    and single-mask output unless asked: a learned dense prompt is not an ambiguous click."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 (SAM2's Hiera windows), got {image_size}")
    grid = image_size // 16
    overrides = [f"++model._target_={MODEL_CLASS}", f"++model.image_size={image_size}"]
    for attention in ("self_attention", "cross_attention"):
        overrides.append(f"++model.memory_attention.layer.{attention}.feat_sizes=[{grid},{grid}]")
    if not multimask_output:
        overrides.append("++model.multimask_output_in_sam=false")
    return overrides


def build_model(
    variant: str | None = None,
    image_size: int = 1024,
    checkpoint: str | Path | None = None,
    multimask_output: bool = False,
    device: str | torch.device = "cpu",
    release: str | None = None,
):
    """SAM2 of `variant` and `release` at `image_size` as an AutoSAM2 (no prompt encoder attached yet);
    each None: what `checkpoint` holds, else hiera_t, sam2.1 (`sam2_checkpoint.settle`).

    Without a checkpoint the weights are random (tests, demo); with one, every SAM2 key must load.
    """
    if variant is not None and variant not in {v.value for v in Variant}:
        raise ValueError(f"unknown SAM2 variant {variant!r}; choose one of {[v.value for v in Variant]}")
    variant, release, found = settle(variant, release, checkpoint)
    # apply_postprocessing=False: its dynamic multimask fallback would make inference differ from training
    model = build_sam2(
        CONFIGS[(release, variant)],
        ckpt_path=None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=sam2_overrides(image_size, multimask_output),
        apply_postprocessing=False,
    )
    if found is not None:
        load_state(model, found, allow_missing=())
    return model.to(device)


def build_autosam2(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """The model of a run: SAM2 of `cfg.variant` and `cfg.release` (loaded from `cfg.checkpoint`, random
    without one), the learned prompt encoder of `cfg.prompt`, the parts `cfg.freeze` names frozen, the
    image encoder compiled if `cfg.compile`, activations recomputed in the backward pass if
    `cfg.activation_checkpointing` (`AutoSAM2.checkpoint_activations`), on `device`."""
    model = build_model(
        cfg.variant, cfg.image_size, cfg.checkpoint, cfg.multimask_output, release=cfg.release
    )
    model.attach_prompt_encoder(cfg.prompt)
    model.freeze(cfg.freeze)
    if cfg.activation_checkpointing:
        model.checkpoint_activations()
    if cfg.compile:
        model.compile_image_encoder(cfg.compile_backend)
    return model.to(device)


def load_sam2_checkpoint(
    model: torch.nn.Module, path: str | Path, allow_missing: Iterable[str] = OWN_MODULES
) -> None:
    """Load a SAM2 checkpoint in Meta's format (``{"model": state_dict}``) strictly (`load_state`); a
    file that is not one is one CheckpointError saying what it is."""
    load_state(model, read_sam2_checkpoint(path), allow_missing)


def load_state(model: torch.nn.Module, found: Sam2File, allow_missing: Iterable[str] = OWN_MODULES) -> None:
    """Every key of the file must exist in the model and every model key must come from the file, except
    keys under the `allow_missing` prefixes (our own modules, absent from Meta's checkpoints). Anything
    else is one CheckpointError listing the keys."""
    state = found.state
    allow = tuple(allow_missing)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(allow))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"{found.path}: holds {found.holds}, which does not fit this model; " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)


def save_sam2_checkpoint(
    model: torch.nn.Module, path: str | Path, exclude: Iterable[str] = OWN_MODULES
) -> None:
    """Write SAM2's own weights in the official format (our modules left out), atomically."""
    path = Path(path)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(exclude))}
    with atomic_file(path) as f:
        torch.save({"model": state}, f)
