"""JPEG decoding, in frames/s, in one process (as evaluation reads): PIL into an array, the project's
decoder on the CPU (torchvision), and on the device (nvJPEG on a GPU): whether `evaluate --decode-device`
helps."""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from autosam2.arguments import add_device, positive_int
from autosam2.bench.common import default_device, sync
from autosam2.data.codec import decode_image


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device(p, default_device(), device_alias=True)
    p.add_argument("--size", type=positive_int, default=1024, help="frame side (default 1024)")
    p.add_argument("--frames", type=positive_int, default=64, help="frames decoded per decoder (default 64)")


def jpeg_frames(count: int, size: int) -> list[bytes]:
    """`count` smooth random frames of `size`², JPEG-encoded at quality 90."""
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(count):
        smooth = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def rate(decode: Callable[[bytes], Any], frames: list[bytes], device: torch.device) -> float:
    """Frames/s of `decode` over `frames`, after one warm-up frame."""
    decode(frames[0])
    start = time.perf_counter()
    for data in frames:
        decode(data)
    sync(device)
    return len(frames) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    frames = jpeg_frames(args.frames, args.size)
    device = torch.device(args.device)
    pil = rate(lambda data: np.array(Image.open(io.BytesIO(data)).convert("RGB")), frames, device)
    cpu = rate(lambda data: decode_image(data, "frame"), frames, device)
    there = rate(lambda data: decode_image(data, "frame", device), frames, device)
    return {
        "size": args.size,
        "frames": args.frames,
        "pil_fps": round(pil, 1),
        "cpu_fps": round(cpu, 1),
        "device_fps": round(there, 1),
        "device": str(device),
        "cpu_over_pil": round(cpu / pil, 2),
        "device_over_cpu": round(there / cpu, 2),
    }
