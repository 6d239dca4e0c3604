"""Inference speed, in frames/s: streaming inference (image encoder, learned prompt, memory;
`--encode-batch` frames through the encoder together, memory one frame at a time) against the bare image
encoder on the same frames, and the whole evaluation pipeline (`autosam2 evaluate`'s: JPEG frames read
from a polyp_gen folder, inference, sunseg metrics, masks, soft maps and overlays written) against that
streaming inference, on the same device and settings."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from autosam2.arguments import add_device, add_encode_batch, positive_int
from autosam2.bench.common import default_device, model_config, sync
from autosam2.config import Variant
from autosam2.data.sources import read_sequences
from autosam2.data.synthetic import SynthSpec, write_dataset
from autosam2.eval.inference import evaluate_sequences
from autosam2.eval.report import PredictionWriter
from autosam2.model.sam2_builder import build_autosam2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="hiera_t", choices=[v.value for v in Variant])
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--frames", type=positive_int, default=64, help="frames of the sequence (default 64)")
    add_encode_batch(p)
    p.add_argument("--rounds", type=positive_int, default=3)
    add_device(p, default_device(), device_alias=True)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")


class _Passes:
    """One timed pass over the frames each way: the bare image encoder, streaming inference, and the
    evaluate pipeline over the same frames as JPEG files of a polyp_gen root under `tmp`."""

    def __init__(self, args: argparse.Namespace, model, tmp: Path):
        self.args, self.model, self.tmp = args, model, tmp
        self.device = torch.device(args.device)
        size = args.image_size
        self.frames = [torch.randn(1, 3, size, size, device=self.device) for _ in range(args.frames)]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.bf16)
        write_dataset(
            tmp / "data",
            SynthSpec(train_sequences=1, valid_sequences=1, frames=args.frames, size=size, seed=0),
        )

    def encoder(self) -> float:
        start = time.perf_counter()
        with torch.no_grad(), self.autocast:
            for frame in self.frames:
                self.model.image_encoder(frame)
        sync(self.device)
        return time.perf_counter() - start

    def stream(self) -> float:
        start = time.perf_counter()
        frames, batch = self.frames, self.args.encode_batch
        with self.autocast:
            for _ in self.model.stream(iter(frames), num_frames=len(frames), encode_batch=batch):
                pass
        sync(self.device)
        return time.perf_counter() - start

    def evaluate(self) -> float:
        out = self.tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        decode = self.device if self.device.type == "cuda" else None  # as `evaluate --decode-device auto`
        start = time.perf_counter()
        with self.autocast:
            evaluate_sequences(
                self.model,
                read_sequences(self.tmp / "data", "valid", 0, 1, decode_device=decode),
                self.device,
                "video",
                "sunseg",
                self.args.encode_batch,
                sink=PredictionWriter(out),
            )
        sync(self.device)
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_autosam2(model_config(args.variant, args.image_size), device).eval()
    compiled = model.compile_image_encoder(args.compile_backend) if args.compile else None
    tmp = Path(tempfile.mkdtemp(prefix="autosam2-bench-infer-"))
    try:
        passes = _Passes(args, model, tmp)
        start = time.perf_counter()
        passes.encoder(), passes.stream(), passes.evaluate()  # warm-up (and compilation)
        warm_up = time.perf_counter() - start
        encoder, streaming, evaluate = ([] for _ in range(3))
        for _ in range(args.rounds):  # interleaved: a slow stretch of the machine hits all three
            encoder.append(passes.encoder())
            streaming.append(passes.stream())
            evaluate.append(passes.evaluate())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    encoder_s, streaming_s, evaluate_s = (statistics.median(t) for t in (encoder, streaming, evaluate))
    ratio = streaming_s / evaluate_s
    return {
        "bench": "infer",
        "fps": {
            "streaming_inference": round(args.frames / streaming_s, 2),
            "bare_image_encoder": round(args.frames / encoder_s, 2),
            "evaluate_pipeline": round(args.frames / evaluate_s, 2),
        },
        "ratio_streaming_over_encoder": round(encoder_s / streaming_s, 3),
        "ratio_evaluate_over_streaming": round(ratio, 3),
        "target": {"evaluate_over_streaming": 0.9, "met": ratio >= 0.9},
        "config": {
            "variant": args.variant,
            "image_size": args.image_size,
            "frames": args.frames,
            "encode_batch": args.encode_batch,
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
