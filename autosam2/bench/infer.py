"""Inference speed: streaming inference (image encoder, learned prompt, memory; one frame at a time)
against the bare image encoder on the same frames, in frames/s."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from autosam2.bench.common import default_device, sync
from autosam2.config import ModelConfig, Variant
from autosam2.model.sam2_builder import build_autosam2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="hiera_t", choices=[v.value for v in Variant])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default=default_device())
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_autosam2(
        ModelConfig(variant=Variant(args.variant), image_size=args.image_size), device
    ).eval()
    compiled = model.compile_image_encoder(args.compile_backend) if args.compile else None
    frames = [torch.randn(1, 3, args.image_size, args.image_size, device=device) for _ in range(args.frames)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def encoder_pass() -> float:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            for frame in frames:
                model.image_encoder(frame)
        sync(device)
        return time.perf_counter() - start

    def stream_pass() -> float:
        start = time.perf_counter()
        with autocast:
            for _ in model.stream(iter(frames), num_frames=len(frames)):
                pass
        sync(device)
        return time.perf_counter() - start

    start = time.perf_counter()
    encoder_pass(), stream_pass()  # warm-up (and compilation)
    warm_up = time.perf_counter() - start
    encoder = statistics.median(encoder_pass() for _ in range(args.rounds))
    streaming = statistics.median(stream_pass() for _ in range(args.rounds))
    return {
        "bench": "infer",
        "fps": {
            "streaming_inference": round(args.frames / streaming, 2),
            "bare_image_encoder": round(args.frames / encoder, 2),
        },
        "ratio_streaming_over_encoder": round(encoder / streaming, 3),
        "config": {
            "variant": args.variant,
            "image_size": args.image_size,
            "frames": args.frames,
            "rounds": args.rounds,
            "device": str(device),
            "bf16": args.bf16,
            "compile": args.compile,
            "compile_backend": args.compile_backend if args.compile else None,
            "compiled_ran": bool(compiled and compiled.active),  # False: compile failed, eager ran
            "warm_up_s": round(warm_up, 1),
            "torch_threads": torch.get_num_threads(),
        },
    }
