"""Prediction overlays people look at: frames with the predicted polyp in red and the truth outlined in green."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from autosam2.atomic import atomic_file


def _outline(mask_HW: np.ndarray) -> np.ndarray:
    inner = mask_HW.copy()
    inner[1:, :] &= mask_HW[:-1, :]
    inner[:-1, :] &= mask_HW[1:, :]
    inner[:, 1:] &= mask_HW[:, :-1]
    inner[:, :-1] &= mask_HW[:, 1:]
    return mask_HW & ~inner


def overlay(
    image_HWC: np.ndarray, pred_HW: np.ndarray, gt_HW: np.ndarray | None = None, label: str | None = None
) -> Image.Image:
    """uint8 RGB frame + boolean masks -> one picture (prediction tinted red, truth outlined green)."""
    out = image_HWC.astype(np.float32)
    red = np.array([255.0, 40.0, 40.0])
    out[pred_HW] = 0.55 * out[pred_HW] + 0.45 * red
    if gt_HW is not None:
        edge = _outline(gt_HW)
        out[edge] = [40.0, 255.0, 40.0]
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if label:
        ImageDraw.Draw(picture).text((4, 4), label, fill=(255, 255, 255))
    return picture


def write_gif(frames: Sequence[Image.Image], path: str | Path, fps: float = 6.0, max_side: int = 320) -> Path:
    """An animated GIF, frames shrunk to at most `max_side` pixels; written atomically."""
    path = Path(path)
    shrunk = [f.copy() for f in frames]
    for f in shrunk:
        f.thumbnail((max_side, max_side))
    with atomic_file(path) as f:
        shrunk[0].save(
            f, format="GIF", save_all=True, append_images=shrunk[1:], duration=int(1000 / fps), loop=0
        )
    return path


def contact_sheet(frames: Sequence[Image.Image], columns: int = 8, tile: int = 160) -> Image.Image:
    """Frames side by side in a grid, for a PNG that shows a whole sequence at a glance."""
    rows = (len(frames) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * tile))
    for i, frame in enumerate(frames):
        small = frame.copy()
        small.thumbnail((tile, tile))
        sheet.paste(small, ((i % columns) * tile, (i // columns) * tile))
    return sheet
