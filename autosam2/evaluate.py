"""Evaluation: streaming inference over whole sequences (folder or shards), per-sequence metrics, outputs.

Used by the trainer's periodic validation and by `autosam2 evaluate`, which writes predicted masks in
the polyp_gen layout, overlays (GIF + PNG sheet per sequence), metrics as JSON and CSV, and logs to MLflow.
Metrics are computed at each sequence's own resolution: predictions are resized back before scoring.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from autosam2.data.sources import read_sequences
from autosam2.data.transforms import model_input
from autosam2.data.video import VideoDatapoint
from autosam2.metrics import MetricAccumulator
from autosam2.model.autosam2 import AutoSAM2


def predict(
    model: AutoSAM2, video: VideoDatapoint, device: torch.device, mode: str = "video", encode_batch: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[T,H,W]`` at the video's own size (zero where judged polyp-free), presence ``[T]``."""
    size = model.image_size
    frames = (model_input(frame.image_CHW, size, device) for frame in video.frames)
    h, w = video.size
    probs, presence = [], []
    for out in model.stream(
        frames, num_frames=len(video), per_frame=mode == "frame", encode_batch=encode_batch
    ):
        prob = out.probs_BHW[None].float()
        if (h, w) != (size, size):
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
        probs.append(prob[0, 0].cpu().numpy())
        presence.append(float(out.presence_B[0]))
    return np.stack(probs), np.array(presence)


def mean_over_sequences(per_sequence: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over sequences (each sequence already averaged over its frames)."""
    keys = sorted({k for m in per_sequence.values() for k in m})
    return {k: statistics.fmean(m[k] for m in per_sequence.values() if k in m) for k in keys}


def evaluate_sequences(
    model: AutoSAM2,
    sequences: Iterator[VideoDatapoint],
    device: torch.device,
    mode: str = "video",
    metric_mode: str = "ours",
    encode_batch: int = 1,
    on_sequence=None,
) -> dict[str, dict[str, float]]:
    """Per-sequence metrics of this process's sequences; `on_sequence(video, probs, presence)` sees each."""
    was_training = model.training
    model.eval()
    accumulator = MetricAccumulator(mode=metric_mode)
    try:
        for video in sequences:
            probs, presence = predict(model, video, device, mode, encode_batch)
            gts = np.stack([f.object_mask().numpy() for f in video.frames])
            accumulator.add_sequence(video.video_id, probs, gts)
            if on_sequence:
                on_sequence(video, probs, presence)
    finally:
        model.train(was_training)
    return accumulator.per_sequence()


# `autosam2 evaluate` ------------------------------------------------------------------------------------


def _pictures(video: VideoDatapoint, probs: np.ndarray) -> list[Image.Image]:
    from autosam2.overlays import overlay

    return [
        overlay(f.image_CHW.permute(1, 2, 0).numpy(), p >= 0.5, f.object_mask().numpy(), label=f.name)
        for f, p in zip(video.frames, probs, strict=True)
    ]


def write_overlay_gif(folder: Path, video: VideoDatapoint, probs: np.ndarray) -> Path:
    """The sequence as an animated GIF: prediction in red, ground truth outlined in green."""
    from autosam2.overlays import write_gif

    return write_gif(_pictures(video, probs), folder / f"{video.video_id}.gif")


def _write_outputs(out: Path, video: VideoDatapoint, probs: np.ndarray, overlays: bool) -> None:
    from autosam2.overlays import contact_sheet, write_gif

    mask_dir = out / "masks" / video.video_id
    mask_dir.mkdir(parents=True, exist_ok=True)
    for frame, prob in zip(video.frames, probs, strict=True):
        Image.fromarray((prob >= 0.5).astype(np.uint8) * 255).save(
            mask_dir / f"{frame.name or frame.frame_index}.png"
        )
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
        pictures = _pictures(video, probs)
        write_gif(pictures, out / "overlays" / f"{video.video_id}.gif")
        contact_sheet(pictures).save(out / "overlays" / f"{video.video_id}.png")


def write_metrics(
    out: Path, per_sequence: dict[str, dict[str, float]], summary: dict[str, float], extra: dict[str, Any]
) -> None:
    (out / "metrics.json").write_text(
        json.dumps({"summary": summary, "per_sequence": per_sequence, **extra}, indent=1, sort_keys=True)
        + "\n"
    )
    keys = sorted(summary)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["sequence", *keys])
    for name in sorted(per_sequence):
        writer.writerow([name, *(f"{per_sequence[name].get(k, float('nan')):.6f}" for k in keys)])
    writer.writerow(["mean", *(f"{summary[k]:.6f}" for k in keys)])
    (out / "metrics.csv").write_text(buf.getvalue())


def load_trained_model(
    weights: str | Path, checkpoint: str | Path | None, device: torch.device
) -> tuple[AutoSAM2, dict[str, Any]]:
    """Rebuild the trained model from a weights file (and the SAM2 checkpoint it was trained from)."""
    from autosam2.engine.checkpoint import read_weights
    from autosam2.engine.engines import load_trainable
    from autosam2.model.prompt_encoder import PromptEncoderConfig
    from autosam2.model.sam2_builder import build_model

    payload = read_weights(weights)
    cfg = payload["model_config"]
    if not payload["full"] and checkpoint is None and cfg.get("checkpoint"):
        raise ValueError(
            f"{weights}: holds the trained parts only; pass --checkpoint {cfg['checkpoint']} (the SAM2 it was trained from)"
        )
    model = build_model(
        cfg["variant"],
        cfg["image_size"],
        checkpoint=checkpoint,
        multimask_output=cfg.get("multimask_output", False),
    )
    prompt = PromptEncoderConfig(**{**cfg["prompt"], "backbone_weights": None})
    model.attach_prompt_encoder(prompt)
    load_trainable(model, payload["model"], weights)
    return model.to(device).eval(), payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="autosam2 evaluate", description="streaming inference + metrics over a valid split"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="the SAM2 checkpoint the weights were trained from (omit for random-init runs)",
    )
    parser.add_argument(
        "--weights", required=True, help="weights file written by `autosam2 train` (final.pt / best.pt)"
    )
    parser.add_argument("--dataset", default="polyp_gen", choices=["polyp_gen"])
    parser.add_argument("--data", default="demo/shards/valid", help="a shard set or a polyp_gen root")
    parser.add_argument(
        "--split", default="valid", choices=["train", "valid"], help="split, when --data is a polyp_gen root"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="frames encoded together by the image encoder"
    )
    parser.add_argument("--output-dir", default="results")
    parser.add_argument(
        "--mode",
        default="video",
        choices=["video", "frame"],
        help="video: SAM2 memory; frame: every frame alone",
    )
    parser.add_argument("--metric-mode", default="ours", choices=["ours", "sunseg"])
    parser.add_argument("--gpu", type=int, default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: SQLite in the output directory)"
    )
    parser.add_argument("--experiment", default="autosam2")
    args = parser.parse_args(argv)

    from autosam2.atomic import atomic_directory
    from autosam2.tracking import default_tracking_uri, make_logger

    device = (
        torch.device("cpu")
        if args.cpu or not torch.cuda.is_available()
        else torch.device("cuda", args.gpu or 0)
    )
    model, payload = load_trained_model(args.weights, args.checkpoint, device)
    out = Path(args.output_dir)
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        per_sequence = evaluate_sequences(
            model,
            read_sequences(args.data, args.split, 0, 1),
            device,
            args.mode,
            args.metric_mode,
            args.batch_size,
            on_sequence=lambda video, probs, presence: _write_outputs(
                tmp, video, probs, not args.no_overlays
            ),
        )
        if not per_sequence:
            raise ValueError(f"{args.data}: no sequences to evaluate")
        summary = mean_over_sequences(per_sequence)
        write_metrics(
            tmp,
            per_sequence,
            summary,
            {
                "weights": str(args.weights),
                "data": str(args.data),
                "mode": args.mode,
                "metric_mode": args.metric_mode,
            },
        )
    _print_table(per_sequence, summary)
    uri = args.tracking_uri or default_tracking_uri(out.resolve())
    logger = make_logger(
        0,
        True,
        uri,
        args.experiment,
        run_name=f"evaluate-{Path(args.weights).stem}-{args.mode}",
        system_metrics=False,
    )
    try:
        logger.log_params(
            {
                "weights": str(args.weights),
                "data": str(args.data),
                "mode": args.mode,
                "metric_mode": args.metric_mode,
                "checkpoint": str(args.checkpoint),
            }
        )
        logger.log_metrics({f"eval/{k}": v for k, v in summary.items()}, step=0)
        for name in ("metrics.json", "metrics.csv"):
            logger.log_artifact(out / name)
        if (out / "overlays").is_dir():
            logger.log_artifact(out / "overlays")
    finally:
        logger.close()
    print(f"wrote {out}: masks/, {'overlays/, ' if not args.no_overlays else ''}metrics.json, metrics.csv")
    return 0


def _print_table(
    per_sequence: dict[str, dict[str, float]], summary: dict[str, float], file=sys.stdout
) -> None:
    width = max(8, *(len(n) for n in per_sequence))
    print(f"{'sequence':<{width}}  {'dice':>6}  {'iou':>6}", file=file)
    for name in sorted(per_sequence, key=lambda n: (len(n), n)):
        m = per_sequence[name]
        print(f"{name:<{width}}  {m['dice']:6.3f}  {m['iou']:6.3f}", file=file)
    print(f"{'mean':<{width}}  {summary['dice']:6.3f}  {summary['iou']:6.3f}", file=file)
