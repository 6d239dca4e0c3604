"""The video data model: Object, Frame, VideoDatapoint, and the clip batch the model eats.

Shape legend: T frames in a clip, B clips in a batch, C=3 colour channels, H x W pixels.
A polyp_gen frame holds one tracked object, the polyp (id ``POLYP_ID``); its mask may be empty, which is
how a polyp-free frame is represented, so the object keeps its identity across frames where it is absent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from autosam2.errors import DatasetError

POLYP_ID = 1


@dataclass(frozen=True)
class Object:
    """One segmented object in one frame: a boolean mask ``[H,W]`` (empty when the object is absent)."""

    object_id: int
    frame_index: int
    mask_HW: torch.Tensor

    def __post_init__(self) -> None:
        if self.mask_HW.dim() != 2 or self.mask_HW.dtype != torch.bool:
            raise ValueError(
                f"Object mask must be a bool [H,W] tensor, got {self.mask_HW.dtype} {tuple(self.mask_HW.shape)}"
            )


@dataclass
class Frame:
    """One video frame: its index in the video, the image ``[3,H,W]`` and its objects."""

    frame_index: int
    image_CHW: torch.Tensor
    objects: list[Object] = field(default_factory=list)
    name: str = ""

    def object_mask(self, object_id: int = POLYP_ID) -> torch.Tensor:
        """Mask ``[H,W]`` of one object; all False when the frame does not hold it."""
        for obj in self.objects:
            if obj.object_id == object_id:
                return obj.mask_HW
        return torch.zeros(self.image_CHW.shape[-2:], dtype=torch.bool)


@dataclass
class VideoDatapoint:
    """A run of consecutive frames of one video, with its size ``(H, W)`` and free-form metadata."""

    video_id: str
    frames: list[Frame]
    size: tuple[int, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for frame in self.frames:
            if tuple(frame.image_CHW.shape[-2:]) != tuple(self.size):
                raise ValueError(
                    f"{self.video_id}: frame {frame.name or frame.frame_index} is "
                    f"{tuple(frame.image_CHW.shape[-2:])}, the video is {tuple(self.size)}"
                )

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class LazyVideo:
    """A whole sequence read frame by frame, so its length costs no memory: name, size ``(H, W)`` and
    length (None when a video file does not say) are known up front, and `frames()` decodes each frame
    only when it is reached, once. Evaluation, validation and `autosam2 predict` read sequences this way.

    A sequence found unreadable part way raises the reader's DatasetError from `frames()`; under
    ``on_error=skip`` the reader has said so and raises `SequenceSkipped`, and whoever consumed the frames
    forgets the sequence.
    """

    video_id: str
    size: tuple[int, int]
    num_frames: int | None
    read: Callable[[], Iterator[Frame]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.num_frames is None:
            raise TypeError(f"{self.video_id}: the number of frames is not known before reading")
        return self.num_frames

    def frames(self) -> Iterator[Frame]:
        for frame in self.read():
            if tuple(frame.image_CHW.shape[-2:]) != tuple(self.size):
                raise DatasetError(
                    f"{self.video_id}: frame {frame.name or frame.frame_index} is "
                    f"{tuple(frame.image_CHW.shape[-2:])}, the video is {tuple(self.size)}"
                )
            yield frame

    def load(self) -> VideoDatapoint:
        """Every frame in memory, as one VideoDatapoint (for short sequences and tests)."""
        return VideoDatapoint(self.video_id, list(self.frames()), self.size, dict(self.metadata))

    @classmethod
    def of(cls, video: VideoDatapoint) -> LazyVideo:
        """A sequence already in memory, read as a lazy one."""
        return cls(video.video_id, tuple(video.size), len(video), lambda: iter(video.frames), video.metadata)


@dataclass
class ClipBatch:
    """B clips of T frames each, time-major as SAM2 consumes them.

    images_TBCHW: image tensors as the frames hold them (uint8 from the readers, float after transforms);
    masks_TBHW: bool masks of the polyp; present_TB: bool, the polyp is visible in the frame;
    frame_indices_TB: index of each frame in its video; video_ids: B names;
    augment: per clip, the augmentation drawn by the loader (transforms.AugmentParams), applied later on
    the training device by ``transforms.prepare_batch``; None for evaluation.
    """

    images_TBCHW: torch.Tensor
    masks_TBHW: torch.Tensor
    present_TB: torch.Tensor
    frame_indices_TB: torch.Tensor
    video_ids: list[str]
    augment: list[Any] | None = None

    @property
    def num_frames(self) -> int:
        return self.images_TBCHW.shape[0]

    @property
    def batch_size(self) -> int:
        return self.images_TBCHW.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ClipBatch:
        return replace(
            self,
            images_TBCHW=self.images_TBCHW.to(device, non_blocking=non_blocking),
            masks_TBHW=self.masks_TBHW.to(device, non_blocking=non_blocking),
            present_TB=self.present_TB.to(device, non_blocking=non_blocking),
            frame_indices_TB=self.frame_indices_TB.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> ClipBatch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return replace(
            self,
            images_TBCHW=self.images_TBCHW.pin_memory(),
            masks_TBHW=self.masks_TBHW.pin_memory(),
            present_TB=self.present_TB.pin_memory(),
            frame_indices_TB=self.frame_indices_TB.pin_memory(),
        )


def any_pixel(masks: torch.Tensor) -> torch.Tensor:
    """Whether each mask ``[..., H, W]`` (bool) has a pixel set; ``[...]`` bool.

    Computed as a uint8 max: torch's bool ``any`` over the CPU is about 50x slower.
    """
    return masks.flatten(-2).view(torch.uint8).amax(dim=-1).bool()


def collate_clips(clips: Sequence[VideoDatapoint], object_id: int = POLYP_ID) -> ClipBatch:
    """Stack clips of equal length and size into a time-major ClipBatch (carrying drawn augmentations)."""
    if not clips:
        raise ValueError("collate_clips needs at least one clip")
    lengths = {len(c) for c in clips}
    sizes = {tuple(c.size) for c in clips}
    if len(lengths) != 1 or len(sizes) != 1:
        detail = ", ".join(f"{c.video_id}: {len(c)} frames {tuple(c.size)}" for c in clips)
        raise ValueError(f"clips in a batch must share length and size; got {detail}")
    t, b = lengths.pop(), len(clips)
    frames = [c.frames[i] for i in range(t) for c in clips]  # time-major
    # decoders give channel-last pixels: stacking them as they lie is a plain copy (a channel-first
    # stack would gather with strides, costing nearly as much as decoding); the result is a
    # channels-last [T,B,3,H,W] view, which the device-side conversion in prepare_batch reads as is
    images = torch.stack([f.image_CHW.permute(1, 2, 0) for f in frames])
    images = images.unflatten(0, (t, b)).permute(0, 1, 4, 2, 3)
    masks = torch.stack([f.object_mask(object_id) for f in frames]).unflatten(0, (t, b))
    indices = torch.tensor([[f.frame_index for f in c.frames] for c in clips], dtype=torch.long).T
    return ClipBatch(
        images_TBCHW=images,
        masks_TBHW=masks,
        present_TB=any_pixel(masks),
        frame_indices_TB=indices.contiguous(),
        video_ids=[c.video_id for c in clips],
        augment=[c.metadata["augment"] for c in clips]
        if all("augment" in c.metadata for c in clips)
        else None,
    )
