"""Test fixtures that reproduce published dataset layouts exactly (folders, names, extensions, mask
naming), one module per layout, with tiny synthetic pixels: a frame and its polyp mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def frame_and_mask(rng: np.random.Generator, size: int, polyp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An RGB frame (reddish noise) and its 0/255 mask: an ellipse brighter than the background, or none."""
    frame = (rng.random((size, size, 3)) * 60 + np.array([120, 60, 50])).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if polyp:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        ry, rx = rng.integers(size // 8, size // 4, 2)
        yy, xx = np.ogrid[:size, :size]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        mask[inside] = 255
        frame[inside] = np.clip(frame[inside].astype(int) + 70, 0, 255)
    return frame, mask


def save(array: np.ndarray, path: Path) -> Path:
    """Write an image, its format told by the suffix (JPEG at quality 95)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(array).save(path, **options)
    return path
