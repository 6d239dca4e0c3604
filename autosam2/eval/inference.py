"""Streaming inference over whole sequences (folder or shards) and their per-frame metrics.

Used by the trainer's periodic validation and by `autosam2 evaluate`. Metrics are computed at each
sequence's own resolution: predictions are resized back before scoring, and gathered in one
`MetricAccumulator`, whose summary is the only one the project computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from autosam2.data.transforms import model_input
from autosam2.data.video import VideoDatapoint
from autosam2.metrics import MetricAccumulator, Mode
from autosam2.model.autosam2 import AutoSAM2

OnSequence = Callable[[VideoDatapoint, np.ndarray, np.ndarray], None]


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


def evaluate_sequences(
    model: AutoSAM2,
    sequences: Iterable[VideoDatapoint],
    device: torch.device,
    mode: str = "video",
    metric_mode: Mode = "ours",
    encode_batch: int = 1,
    on_sequence: OnSequence | None = None,
) -> MetricAccumulator:
    """The metrics of this process's sequences; `on_sequence(video, probs, presence)` sees each."""
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
    return accumulator
