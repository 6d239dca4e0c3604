"""Clip-consistent transforms: resize to the model's size, one random augmentation per clip, SAM2 normalisation.

Split in two on purpose. Loader workers do the per-clip work that shrinks data (decode, resize to the
model's size) and *draw* the augmentation parameters from the stream's seeded RNG; the augmentation itself
(flip, affine, colour) and the normalisation run batched on the training device in `prepare_batch`,
where they cost microseconds on a GPU instead of dominating the CPU workers.

Shape legend: T frames, B clips, C=3 colour channels, H x W pixels, S the model's image size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from autosam2.config import AugmentConfig
from autosam2.data.video import ClipBatch, VideoDatapoint, any_pixel

# SAM2 normalises with the ImageNet statistics (sam2.utils.transforms.SAM2Transforms)
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of AugmentConfig, applied to all frames of one clip."""

    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


IDENTITY = AugmentParams()


def sample_augment(rng: np.random.Generator, cfg: AugmentConfig) -> AugmentParams:
    if not cfg.enabled:
        return IDENTITY
    return AugmentParams(
        hflip=bool(rng.random() < cfg.hflip),
        vflip=bool(rng.random() < cfg.vflip),
        angle=float(rng.uniform(-cfg.degrees, cfg.degrees)),
        translate=(
            float(rng.uniform(-cfg.translate, cfg.translate)),
            float(rng.uniform(-cfg.translate, cfg.translate)),
        ),
        scale=float(rng.uniform(cfg.scale_min, cfg.scale_max)),
        brightness=float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)),
        contrast=float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)),
        saturation=float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)),
    )


def resize_video(video: VideoDatapoint, size: int) -> VideoDatapoint:
    """Resize every frame to ``size x size`` (uint8, antialiased) and its mask likewise (area > half)."""
    if tuple(video.size) == (size, size):
        return video
    frames = []
    for frame in video.frames:
        image = F.resize(
            frame.image_CHW, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        objects = [
            replace(obj, mask_HW=F.resize(obj.mask_HW[None].float(), [size, size], antialias=True)[0] >= 0.5)
            for obj in frame.objects
        ]
        frames.append(replace(frame, image_CHW=image, objects=objects))
    metadata = {**video.metadata, "original_size": tuple(video.size)}
    return VideoDatapoint(video.video_id, frames, (size, size), metadata)


def _augment_clip(
    images_TCHW: torch.Tensor, masks_THW: torch.Tensor, p: AugmentParams
) -> tuple[torch.Tensor, torch.Tensor]:
    if p.hflip:
        images_TCHW, masks_THW = F.horizontal_flip(images_TCHW), F.horizontal_flip(masks_THW)
    if p.vflip:
        images_TCHW, masks_THW = F.vertical_flip(images_TCHW), F.vertical_flip(masks_THW)
    side = images_TCHW.shape[-1]
    shift = [round(p.translate[0] * side), round(p.translate[1] * side)]
    if p.angle or p.scale != 1.0 or any(shift):
        images_TCHW = F.affine(
            images_TCHW,
            angle=p.angle,
            translate=shift,
            scale=p.scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
        masks_THW = F.affine(
            masks_THW[:, None].to(torch.uint8),
            angle=p.angle,
            translate=shift,
            scale=p.scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.NEAREST,
        )[:, 0].bool()
    if p.brightness != 1.0:
        images_TCHW = F.adjust_brightness(images_TCHW, p.brightness)
    if p.contrast != 1.0:
        images_TCHW = F.adjust_contrast(images_TCHW, p.contrast)
    if p.saturation != 1.0:
        images_TCHW = F.adjust_saturation(images_TCHW, p.saturation)
    return images_TCHW, masks_THW


def prepare_batch(batch: ClipBatch, device: torch.device | str = "cpu", augment: bool = True) -> ClipBatch:
    """Move a loader batch to `device`, apply each clip's drawn augmentation, normalise as SAM2 expects.

    Images go from uint8 to float32 normalised; masks follow the geometric part of the augmentation, and
    presence is recomputed (an affine can push a polyp out of view).
    """
    batch = batch.to(device, non_blocking=True)
    images = F.to_dtype(batch.images_TBCHW, torch.float32, scale=True)
    masks = batch.masks_TBHW
    if augment and batch.augment is not None:
        out_images, out_masks = [], []
        for b, params in enumerate(batch.augment):
            image_b, mask_b = _augment_clip(images[:, b], masks[:, b], params)
            out_images.append(image_b)
            out_masks.append(mask_b)
        images, masks = torch.stack(out_images, dim=1), torch.stack(out_masks, dim=1)
    t, b = images.shape[:2]
    images = F.normalize(images.flatten(0, 1), list(SAM2_MEAN), list(SAM2_STD)).unflatten(0, (t, b))
    return replace(batch, images_TBCHW=images, masks_TBHW=masks, present_TB=any_pixel(masks))


def model_input(image_CHW: torch.Tensor, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One uint8 frame of any size -> ``[1,3,S,S]`` float, resized and normalised as in training."""
    image = image_CHW.to(device)
    if tuple(image.shape[-2:]) != (size, size):
        image = F.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, list(SAM2_MEAN), list(SAM2_STD))[None]
