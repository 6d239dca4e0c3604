"""Build SAM2 (as our AutoSAM2 subclass) from its config by name, load official checkpoints strictly, and
`build_autosam2`: the one factory of the model a run trains (SAM2, its learned prompt encoder, frozen parts)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from sam2.build_sam import build_sam2

from autosam2.atomic import atomic_file
from autosam2.config import ModelConfig, Variant
from autosam2.errors import CheckpointError

CONFIGS = {variant: f"configs/sam2.1/sam2.1_{variant.value}.yaml" for variant in Variant}
MODEL_CLASS = "autosam2.model.autosam2.AutoSAM2"
OWN_MODULES = ("prompt_encoder.",)  # state_dict prefixes of our modules, which no SAM2 checkpoint holds


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
    variant: str = "hiera_t",
    image_size: int = 1024,
    checkpoint: str | Path | None = None,
    multimask_output: bool = False,
    device: str | torch.device = "cpu",
):
    """SAM2 of `variant` at `image_size` as an AutoSAM2 (no prompt encoder attached yet).

    Without a checkpoint the weights are random (tests, demo); with one, every SAM2 key must load.
    """
    if variant not in CONFIGS:
        raise ValueError(f"unknown SAM2 variant {variant!r}; choose one of {sorted(CONFIGS)}")
    # apply_postprocessing=False: its dynamic multimask fallback would make inference differ from training
    model = build_sam2(
        CONFIGS[variant],
        ckpt_path=None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=sam2_overrides(image_size, multimask_output),
        apply_postprocessing=False,
    )
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint, allow_missing=())
    return model.to(device)


def build_autosam2(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """The model of a run: SAM2 of `cfg.variant` (loaded from `cfg.checkpoint`, random without one), the
    learned prompt encoder of `cfg.prompt`, the parts `cfg.freeze` names frozen, the image encoder compiled
    if `cfg.compile`, on `device`."""
    model = build_model(cfg.variant, cfg.image_size, cfg.checkpoint, cfg.multimask_output)
    model.attach_prompt_encoder(cfg.prompt)
    model.freeze(cfg.freeze)
    if cfg.compile:
        model.compile_image_encoder(cfg.compile_backend)
    return model.to(device)


def load_sam2_checkpoint(
    model: torch.nn.Module, path: str | Path, allow_missing: Iterable[str] = OWN_MODULES
) -> None:
    """Load an official SAM2 checkpoint (``{"model": state_dict}``) strictly.

    Every key of the file must exist in the model and every model key must come from the file, except
    keys under the `allow_missing` prefixes (our own modules, absent from Meta's checkpoints). Anything
    else is one CheckpointError listing the keys.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: checkpoint file not found") from err
    except Exception as err:  # torch.load raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: expected the official SAM2 format {{'model': state_dict}}")
    state = payload["model"]
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
        raise CheckpointError(f"{path}: does not fit this model; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def save_sam2_checkpoint(
    model: torch.nn.Module, path: str | Path, exclude: Iterable[str] = OWN_MODULES
) -> None:
    """Write SAM2's own weights in the official format (our modules left out), atomically."""
    path = Path(path)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(exclude))}
    with atomic_file(path) as f:
        torch.save({"model": state}, f)
