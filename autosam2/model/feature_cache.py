"""The frozen image encoder's output kept per frame, so a frame trained on again costs no encoder pass.

With the image encoder frozen and frames that reach it unchanged (no augmentation but flips), a frame's
encoder output is the same every time the frame comes back; on the CPU demo (hiera-t, 256 px, one
thread per rank) that pass is about 78% of a frame-mode training step. The cache keys each frame by
(video, frame index, horizontal flip, vertical flip), computes a frame it does not hold on its own (a
batch of one, so the stored value does not depend on which frames shared the step: a resumed run, whose
cache starts empty, feeds the model the same numbers as the uninterrupted one), and keeps it in this
process's host memory up to `budget_bytes`; frames beyond the budget are computed every time.

With `share` (under DDP: an all-gather of objects), the frames any rank encoded in a step go to every
rank's cache, so each frame is encoded once in the whole job rather than once per rank (ranks hold the
same frozen weights, so an entry is the same whichever rank made it). The cache lives as long as the process: a new run, a resume, another image size or
encoder starts it empty, so it cannot serve features of another encoder.

Shape legend: N images (time-major T*B), C channels, h x w a feature level's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from autosam2.data.video import ClipBatch

FrameKey = tuple[str, int, bool, bool]


def frame_keys(batch: ClipBatch) -> list[FrameKey]:
    """One key per image of the batch, time-major like ``images_TBCHW.flatten(0, 1)``."""
    t_len, b = batch.frame_indices_TB.shape
    flips = [(False, False)] * b
    if batch.augment is not None:
        flips = [(bool(p.hflip), bool(p.vflip)) for p in batch.augment]
    indices = batch.frame_indices_TB.tolist()
    return [(batch.video_ids[j], int(indices[t][j]), *flips[j]) for t in range(t_len) for j in range(b)]


class FeatureCache:
    """`encode(images, keys)`: the image encoder's output dict for the images, from memory where held."""

    def __init__(
        self,
        encoder: nn.Module,
        budget_bytes: int,
        autocast: bool = False,
        share: Callable[[Any], list[Any]] | None = None,
    ):
        self.encoder = encoder
        self.budget_bytes = budget_bytes
        self.autocast = autocast
        self.share = share  # every rank's object, on every rank (a collective: each step calls it once)
        self.entries: dict[Hashable, list[torch.Tensor]] = {}  # per frame: backbone_fpn levels [C,h,w]
        self.pos: list[torch.Tensor] | None = None  # the position encodings: the same for every frame
        # each level's memory layout as the encoder returns it (Hiera's lower levels are channels-last):
        # handed on in that layout, the decoder's convolutions run the encoder's own kernels, bit for bit
        self.layouts: list[torch.memory_format] = []
        self.bytes = 0
        self.hits = self.misses = 0

    def _compute(self, image_CHW: torch.Tensor) -> list[torch.Tensor]:
        with (
            torch.no_grad(),
            torch.autocast(image_CHW.device.type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            out = self.encoder(image_CHW[None])
        if self.pos is None:
            self.pos = [p.detach() for p in out["vision_pos_enc"]]
            self.layouts = [_layout(level) for level in out["backbone_fpn"]]
        return [level[0].detach() for level in out["backbone_fpn"]]

    def encode(self, images_NCHW: torch.Tensor, keys: Sequence[Hashable]) -> dict[str, Any]:
        if len(keys) != images_NCHW.shape[0]:
            raise ValueError(f"{len(keys)} frame keys for {images_NCHW.shape[0]} images")
        levels, fresh = [], {}
        for image, key in zip(images_NCHW, keys, strict=True):
            held = self.entries.get(key, fresh.get(key))
            if held is not None:
                self.hits += 1
                levels.append([t.to(image.device, non_blocking=True) for t in held])
                continue
            self.misses += 1
            computed = self._compute(image)
            fresh[key] = [t.to("cpu") for t in computed]
            levels.append(computed)
        # the frames every rank encoded this step, kept by all: each frame is encoded once, by one rank
        for new in self.share(fresh) if self.share is not None else [fresh]:
            for key, value in new.items():
                self._keep(key, value)
        fpn = [
            torch.stack(level).contiguous(memory_format=layout)
            for level, layout in zip(zip(*levels, strict=True), self.layouts, strict=True)
        ]
        pos = [p.to(images_NCHW.device).expand(len(keys), -1, -1, -1) for p in self.pos]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}

    def _keep(self, key: Hashable, levels: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in levels)
        if key not in self.entries and self.bytes + size <= self.budget_bytes:
            self.entries[key] = levels
            self.bytes += size

    def take_stats(self) -> dict[str, float]:
        """Hit rate since the last call and the memory held, for the log; the counts start again."""
        looked = self.hits + self.misses
        stats = {
            "train/feature_cache_hit_rate": self.hits / looked if looked else 0.0,
            "train/feature_cache_gb": self.bytes / 1e9,
        }
        self.hits = self.misses = 0
        return stats


def _layout(t: torch.Tensor) -> torch.memory_format:
    channels_last = (
        t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    )
    return torch.channels_last if channels_last else torch.contiguous_format
