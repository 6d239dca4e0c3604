"""The feature cache at a real image size: bytes per frame and hit rates with fp32 and bf16 storage, in
memory alone and with the disk tier, over a few passes through the same frames (as epochs go through a
set). Each frame is encoded once by the frozen image encoder (its time reported); that output is replayed
to every setting, so the settings differ only in what the cache keeps, where, and what a hit costs."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosam2.arguments import add_device, non_negative_int, positive_int
from autosam2.bench.common import default_device, model_config, sync
from autosam2.config import DEFAULT_VARIANT, DataConfig, Variant
from autosam2.model.feature_cache import FeatureCache, feature_cache
from autosam2.model.sam2_builder import build_autosam2

# name -> (data.feature_cache_dtype, whether data.feature_cache_dir is set)
SETTINGS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "fp32+disk": ("fp32", True),
    "bf16+disk": ("bf16", True),
}

NOTES = (
    "memory budget: room for --memory-frames frames in fp32 (bf16 holds twice as many); disk budget: room "
    "for every frame; frames fill memory first, then disk. hit_rate: hits over lookups in the passes after "
    "the first (which only misses); disk_hit_rate: the share of lookups read from disk. lookup_ms: median time "
    "of one frame's lookup that hit memory, hit disk (read through the page cache, memory-mapped) or missed "
    "(the encoder replayed: storing it, and writing it to disk in the disk settings). max_abs_diff: the "
    "features handed back against the encoder's, over all passes (0: bit for bit)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device(p, default_device(), device_alias=True)
    p.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        choices=[v.value for v in Variant],
        help=f"model.variant (default {DEFAULT_VARIANT})",
    )
    p.add_argument("--image-size", type=positive_int, default=512, help="model.image_size (default 512)")
    p.add_argument("--frames", type=positive_int, default=8, help="distinct frames (default 8)")
    p.add_argument("--passes", type=positive_int, default=3, help="passes over the frames (default 3)")
    p.add_argument(
        "--memory-frames",
        type=non_negative_int,
        default=4,
        help="the memory budget, in fp32 frames (default 4; 0: everything goes to disk)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="data.feature_cache_dir for the disk settings (default: a temp folder)",
    )


class _Replay(nn.Module):
    """The encoder's output for each frame, computed once: the settings' misses cost no encoder pass."""

    def __init__(self, outputs: dict[int, dict[str, Any]]):
        super().__init__()
        self.outputs = outputs

    def forward(self, image_1CHW: torch.Tensor) -> dict[str, Any]:
        return self.outputs[int(image_1CHW[0, 0, 0, 0])]


def _encoded(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, dict[int, Any], float]:
    """The frames (frame i's first pixel is i, its key for the replay), each one's encoder output and the
    median seconds per frame of the encoder."""
    torch.manual_seed(0)
    model = build_autosam2(model_config(args.variant, args.image_size), device).eval()
    images = torch.rand(args.frames, 3, args.image_size, args.image_size, device=device)
    images[:, 0, 0, 0] = torch.arange(args.frames, device=device, dtype=images.dtype)
    outputs, times = {}, []
    with torch.no_grad():
        for i in range(args.frames):
            start = time.perf_counter()
            outputs[i] = model.image_encoder(images[i : i + 1])
            sync(device)
            times.append(time.perf_counter() - start)
    return images, outputs, sorted(times)[len(times) // 2]


def _setting(
    cache: FeatureCache, images: torch.Tensor, outputs: dict[int, Any], passes: int
) -> dict[str, Any]:
    """`passes` passes over the frames, one lookup per frame; the hit rates of the passes after the
    first (which only misses), the median time of a memory hit and of a disk hit, the largest difference
    from the encoder's features."""
    keys = [("bench", i, False, False) for i in range(len(images))]
    times: dict[str, list[float]] = {"memory": [], "disk": [], "miss": []}
    diff = 0.0
    for done in range(passes):
        for i, key in enumerate(keys):
            before = (cache.hits, cache.disk_hits)
            start = time.perf_counter()
            got = cache.encode(images[i : i + 1], [key])
            sync(images.device)
            took = time.perf_counter() - start
            kind = "miss" if cache.hits == before[0] else "disk" if cache.disk_hits > before[1] else "memory"
            times[kind].append(took)
            for level, want in zip(got["backbone_fpn"], outputs[i]["backbone_fpn"], strict=True):
                diff = max(diff, float((level - want).abs().max()))
        if done == 0:
            cache.take_stats()  # the rates below are those of the passes after the first
    stats = cache.take_stats()
    disk = cache.disk
    return {
        "bytes_per_frame": cache.frame_bytes,
        "frames_in_memory": len(cache.entries),
        "frames_on_disk": len(disk.files) if disk is not None else 0,
        "disk_bytes": disk.bytes if disk is not None else 0,
        "hit_rate": round(stats["train/feature_cache_hit_rate"], 4) if passes > 1 else None,
        "disk_hit_rate": round(stats.get("train/feature_cache_disk_hit_rate", 0.0), 4)
        if passes > 1
        else None,
        "lookup_ms": {
            kind: round(1000 * statistics.median(t), 2) if t else None for kind, t in times.items()
        },
        "max_abs_diff": diff,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    images, outputs, encode_s = _encoded(args, device)
    replay = _Replay(outputs)
    probe = FeatureCache(replay, 10**12)
    probe.encode(images[:1], [("probe", 0)])
    memory_bytes = args.memory_frames * probe.frame_bytes
    results = {}
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        root = args.dir if args.dir is not None else Path(tmp) / "disk"
        for name, (dtype, on_disk) in SETTINGS.items():
            data = DataConfig(
                feature_cache_dtype=dtype,
                feature_cache_gb=memory_bytes / 1e9,
                feature_cache_dir=str(root) if on_disk else None,
                feature_cache_disk_gb=2 * args.frames * probe.frame_bytes / 1e9,
            )
            cache = feature_cache(replay, data, False, None, (Path(tmp) / "run", 0))
            try:
                results[name] = _setting(cache, images, outputs, args.passes)
            finally:
                cache.close()
    return {
        "bench": "features",
        "variant": args.variant,
        "image_size": args.image_size,
        "device": str(device),
        "frames": args.frames,
        "passes": args.passes,
        "memory_budget_bytes": memory_bytes,
        "encode_s_per_frame": round(encode_s, 4),
        "settings": results,
        "ratio_bytes_fp32_over_bf16": round(
            results["fp32"]["bytes_per_frame"] / results["bf16"]["bytes_per_frame"], 3
        ),
        "notes": NOTES,
    }
