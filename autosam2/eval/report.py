"""What an evaluation leaves for people: predicted masks in the polyp_gen layout, overlays (GIF + PNG sheet
per sequence: prediction red, truth outlined green), ``metrics.json`` / ``metrics.csv``, a table."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from autosam2.atomic import atomic_write_text
from autosam2.data.video import VideoDatapoint
from autosam2.overlays import contact_sheet, overlay, write_gif


def overlay_pictures(video: VideoDatapoint, probs: np.ndarray) -> list[Image.Image]:
    return [
        overlay(f.image_CHW.permute(1, 2, 0).cpu().numpy(), p >= 0.5, f.object_mask().numpy(), label=f.name)
        for f, p in zip(video.frames, probs, strict=True)
    ]


def write_overlay_gif(folder: Path, video: VideoDatapoint, probs: np.ndarray) -> Path:
    """The sequence as an animated GIF: prediction in red, ground truth outlined in green."""
    return write_gif(overlay_pictures(video, probs), folder / f"{video.video_id}.gif")


def write_sequence(out: Path, video: VideoDatapoint, probs: np.ndarray, overlays: bool) -> None:
    """Binary masks ``out/masks/<sequence>/<frame>.png``, and with `overlays` its GIF and PNG sheet."""
    mask_dir = out / "masks" / video.video_id
    mask_dir.mkdir(parents=True, exist_ok=True)
    for frame, prob in zip(video.frames, probs, strict=True):
        Image.fromarray((prob >= 0.5).astype(np.uint8) * 255).save(
            mask_dir / f"{frame.name or frame.frame_index}.png"
        )
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
        pictures = overlay_pictures(video, probs)
        write_gif(pictures, out / "overlays" / f"{video.video_id}.gif")
        contact_sheet(pictures).save(out / "overlays" / f"{video.video_id}.png")


def write_metrics(
    out: Path, per_sequence: dict[str, dict[str, float]], summary: dict[str, float], extra: dict[str, Any]
) -> None:
    """``metrics.json`` (summary, per sequence, `extra`) and ``metrics.csv`` (a row per sequence, then the mean)."""
    atomic_write_text(
        out / "metrics.json",
        json.dumps({"summary": summary, "per_sequence": per_sequence, **extra}, indent=1, sort_keys=True)
        + "\n",
    )
    keys = sorted(summary)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["sequence", *keys])
    for name in sorted(per_sequence):
        writer.writerow([name, *(f"{per_sequence[name].get(k, float('nan')):.6f}" for k in keys)])
    writer.writerow(["mean", *(f"{summary[k]:.6f}" for k in keys)])
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def print_table(
    per_sequence: dict[str, dict[str, float]], summary: dict[str, float], file: TextIO = sys.stdout
) -> None:
    width = max(8, *(len(n) for n in per_sequence))
    print(f"{'sequence':<{width}}  {'dice':>6}  {'iou':>6}", file=file)
    for name in sorted(per_sequence, key=lambda n: (len(n), n)):
        m = per_sequence[name]
        print(f"{name:<{width}}  {m['dice']:6.3f}  {m['iou']:6.3f}", file=file)
    print(f"{'mean':<{width}}  {summary['dice']:6.3f}  {summary['iou']:6.3f}", file=file)
