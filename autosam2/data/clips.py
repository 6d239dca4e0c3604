"""Training clips straight from a polyp_gen folder: the map-style twin of the shard stream's training mode.

For quick runs without shards, and as the baseline the data benchmark compares the shard stream with:
the same window, decode, resize and augmentation draw, seeded by (seed, epoch, index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from autosam2.data.polyp_gen import DatasetError, PolypGenDataset
from autosam2.data.stream import WorkerFailure, worker_seed
from autosam2.data.transforms import AugmentConfig, resize_video, sample_augment
from autosam2.data.video import ClipBatch, VideoDatapoint, collate_clips


class FolderClips(torch.utils.data.Dataset):
    """Clip windows of T frames from a polyp_gen split, resized and with their augmentation drawn."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        clip_len: int,
        image_size: int,
        seed: int = 0,
        stride: int = 1,
        augment: AugmentConfig | None = None,
    ):
        self.dataset = PolypGenDataset(root, split, clip_len=clip_len, stride=stride)
        self.image_size = image_size
        self.seed = seed
        self.augment = augment or AugmentConfig()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> VideoDatapoint | WorkerFailure:
        rng = np.random.default_rng(worker_seed(self.seed, self.epoch, index))
        try:
            video = self.dataset[index]
        except DatasetError as err:
            if torch.utils.data.get_worker_info() is None:
                raise
            return WorkerFailure(err)  # raised as itself in the main process (collate_or_failure)
        video = resize_video(video, self.image_size)
        video.metadata["augment"] = sample_augment(rng, self.augment)
        return video


def collate_or_failure(items: list[VideoDatapoint | WorkerFailure]) -> ClipBatch | WorkerFailure:
    """collate_clips, passing a worker's failure on instead (see `raise_worker_failures`)."""
    failed = next((item for item in items if isinstance(item, WorkerFailure)), None)
    return failed or collate_clips(items)
