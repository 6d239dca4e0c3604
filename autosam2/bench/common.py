"""What the benchmarks share: a synthetic dataset and its shards, the device default, a sync point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from autosam2.config import Config, ModelConfig, load_config
from autosam2.data.synthetic import SynthSpec, write_dataset
from autosam2.data.video import ClipBatch, any_pixel
from autosam2.errors import DatasetError
from autosam2.model.sam2_checkpoint import settle_model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_config(config: Path | None, cfg: Config) -> dict[str, Any]:
    """The run config a benchmark measured, as its figures record it."""
    return {
        "config": str(config) if config else None,
        "variant": str(settle_model(cfg.model).variant),
        "image_size": cfg.model.image_size,
        "clip_len": cfg.data.clip_len,
        "batch_size": cfg.data.batch_size,
        "clip_mode": str(cfg.model.clip_mode),
        "precision": str(cfg.train.precision),
    }


def model_config(variant: str, image_size: int) -> ModelConfig:
    """A benchmark's model settings through the config's checks: a size the model cannot take is one
    ConfigError line."""
    return load_config(None, [f"model.variant={variant}", f"model.image_size={image_size}"]).model


def sync(device: torch.device) -> None:
    """Wait for the device, so a clock read after it times the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_shards(
    tmp: Path, spec: SynthSpec, frames_per_sample: int, workers: int = 1, root: Path | None = None
) -> tuple[Path, Path]:
    """(polyp_gen root, train shard set) under `tmp`: `root` if given, else a synthetic one of `spec`,
    sharded by the `shards` tool as a user would (the library never imports the tool)."""
    if root is None:
        root = tmp / "polyp_gen"
        write_dataset(root, spec)
    out = tmp / "shards"
    cmd = [sys.executable, "-m", "shards", "build", str(root), "--split", "train", "--output-dir", str(out)]
    cmd += ["--frames-per-sample", str(frames_per_sample), "--workers", str(max(1, workers))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # the tool's own one line, e.g. a bad frame of --root
        raise DatasetError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else " ".join(cmd))
    return root, out


def synthetic_clip(t_len: int, batch: int, size: int) -> ClipBatch:
    """A clip as the loader yields it (uint8 images), a square polyp in every frame."""
    images = torch.randint(0, 256, (t_len, batch, 3, size, size), dtype=torch.uint8)
    masks = torch.zeros(t_len, batch, size, size, dtype=torch.bool)
    masks[..., size // 4 : size // 2, size // 4 : size // 2] = True
    indices = torch.arange(t_len)[:, None].expand(t_len, batch).contiguous()
    return ClipBatch(images, masks, any_pixel(masks), indices, [f"clip{i}" for i in range(batch)])
