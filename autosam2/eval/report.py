"""What an evaluation leaves for people: predicted masks in the polyp_gen layout, 8-bit soft maps, overlays
(GIF + PNG sheet per sequence: prediction red, truth outlined green), ``metrics.json`` / ``metrics.csv``, a
table."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from autosam2.atomic import atomic_write_text
from autosam2.data.polyp_gen import natural_key
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


def soft_map(prob_HW: np.ndarray) -> np.ndarray:
    """The 8-bit soft map of a probability map: probability x 255, truncated, as the SUN-SEG toolbox's
    own prediction scripts save theirs (so the sunseg metrics of the file are those of the map)."""
    return (np.clip(prob_HW, 0.0, 1.0) * 255).astype(np.uint8)


def write_sequence(out: Path, video: VideoDatapoint, probs: np.ndarray, overlays: bool) -> None:
    """Binary masks ``out/masks/<sequence>/<frame>.png``, 8-bit soft maps ``out/soft/<sequence>/<frame>.png``
    (re-scorable by `autosam2 score` or the official toolbox), and with `overlays` its GIF and PNG sheet."""
    mask_dir, soft_dir = out / "masks" / video.video_id, out / "soft" / video.video_id
    mask_dir.mkdir(parents=True, exist_ok=True)
    soft_dir.mkdir(parents=True, exist_ok=True)
    for frame, prob in zip(video.frames, probs, strict=True):
        name = f"{frame.name or frame.frame_index}.png"
        Image.fromarray((prob >= 0.5).astype(np.uint8) * 255).save(mask_dir / name)
        Image.fromarray(soft_map(prob)).save(soft_dir / name)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
        pictures = overlay_pictures(video, probs)
        write_gif(pictures, out / "overlays" / f"{video.video_id}.gif")
        contact_sheet(pictures).save(out / "overlays" / f"{video.video_id}.png")


def write_metrics(
    out: Path,
    per_sequence: dict[str, dict[str, float]],
    summary: dict[str, float],
    extra: dict[str, Any],
    columns: Sequence[str] | None = None,
) -> None:
    """``metrics.json`` (summary, per sequence, `extra`) and ``metrics.csv`` (a row per sequence, then the
    mean; `columns` in this order, default all in name order)."""
    atomic_write_text(
        out / "metrics.json",
        json.dumps({"summary": summary, "per_sequence": per_sequence, **extra}, indent=1, sort_keys=True)
        + "\n",
    )
    keys = list(columns) if columns else sorted(summary)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["sequence", *keys])
    for name in sorted(per_sequence):
        writer.writerow([name, *(f"{per_sequence[name].get(k, float('nan')):.6f}" for k in keys)])
    writer.writerow(["mean", *(f"{summary[k]:.6f}" for k in keys)])
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def print_table(
    per_sequence: dict[str, dict[str, float]],
    summary: dict[str, float],
    columns: Sequence[str] = ("dice", "iou"),
    file: TextIO = sys.stdout,
) -> None:
    """A row per sequence (natural order of names), then the summary; one column per metric."""
    width = max(8, *(len(n) for n in per_sequence))
    widths = [max(6, len(c)) for c in columns]
    print(
        f"{'sequence':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)),
        file=file,
    )
    for name in sorted(per_sequence, key=natural_key):
        m = per_sequence[name]
        print(
            f"{name:<{width}}  " + "  ".join(f"{m[c]:{w}.3f}" for c, w in zip(columns, widths, strict=True)),
            file=file,
        )
    print(
        f"{'mean':<{width}}  "
        + "  ".join(f"{summary[c]:{w}.3f}" for c, w in zip(columns, widths, strict=True)),
        file=file,
    )
