import numpy as np
import torch

from autosam2.data.transforms import (
    IDENTITY,
    SAM2_MEAN,
    SAM2_STD,
    AugmentConfig,
    AugmentParams,
    prepare_batch,
    resize_video,
    sample_augment,
)
from autosam2.data.video import POLYP_ID, Frame, Object, VideoDatapoint, collate_clips


def clip(n: int = 3, h: int = 32, w: int = 32, params: AugmentParams | None = None) -> VideoDatapoint:
    frames = []
    for i in range(n):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        image[:, :, : w // 4] = 200  # a bright band on the left
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[4:12, 2:6] = True  # a polyp on the left
        frames.append(Frame(i, image, [Object(POLYP_ID, i, mask)]))
    metadata = {} if params is None else {"augment": params}
    return VideoDatapoint("v", frames, (h, w), metadata)


def test_sampling_is_seeded_and_within_ranges():
    cfg = AugmentConfig(degrees=10, translate=0.05, scale_min=0.9, scale_max=1.1, brightness=0.1)
    a = [sample_augment(np.random.default_rng(4), cfg) for _ in range(2)]
    assert a[0] == a[1]
    draws = [sample_augment(np.random.default_rng(s), cfg) for s in range(200)]
    assert all(-10 <= d.angle <= 10 and 0.9 <= d.scale <= 1.1 and 0.9 <= d.brightness <= 1.1 for d in draws)
    assert 0.3 < np.mean([d.hflip for d in draws]) < 0.7 and not any(d.vflip for d in draws)
    assert sample_augment(np.random.default_rng(0), AugmentConfig(enabled=False)) == IDENTITY


def test_identity_only_normalises_like_sam2():
    batch = prepare_batch(collate_clips([clip(params=IDENTITY)]))
    assert batch.images_TBCHW.dtype == torch.float32
    expected = (200 / 255 - SAM2_MEAN[1]) / SAM2_STD[1]
    assert torch.allclose(batch.images_TBCHW[0, 0, 1, 0, 0], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(
        batch.images_TBCHW[0, 0, 2, 0, -1], torch.tensor(-SAM2_MEAN[2] / SAM2_STD[2]), atol=1e-5
    )


def test_one_draw_applies_to_every_frame_and_to_the_masks():
    flipped = prepare_batch(collate_clips([clip(params=AugmentParams(hflip=True))]))
    for t in range(3):
        assert flipped.masks_TBHW[t, 0, 4:12, -6:-2].all() and not flipped.masks_TBHW[t, 0, :, :16].any()
        assert flipped.images_TBCHW[t, 0, 0, 0, -1] > flipped.images_TBCHW[t, 0, 0, 0, 0]
    turned = prepare_batch(
        collate_clips([clip(params=AugmentParams(angle=30.0, scale=1.2, translate=(0.1, 0.0)))])
    )
    masks = turned.masks_TBHW[:, 0]
    assert all(torch.equal(masks[0], masks[t]) for t in range(3))
    assert not torch.equal(masks[0], clip().frames[0].object_mask())
    # the polyp pixels move with the bright band they sit in
    image = turned.images_TBCHW[0, 0, 0]
    assert image[masks[0]].mean() > image[~masks[0]].mean()


def test_presence_follows_the_augmentation():
    gone = prepare_batch(collate_clips([clip(params=AugmentParams(translate=(-0.5, 0.0)))]))
    assert not gone.present_TB.any()


def test_augmentation_can_be_left_out():
    batch = collate_clips([clip(params=AugmentParams(hflip=True))])
    plain = prepare_batch(batch, augment=False)
    assert torch.equal(plain.masks_TBHW, batch.masks_TBHW)


def test_resize_keeps_masks_aligned():
    video = resize_video(clip(h=64, w=96), 32)
    assert video.size == (32, 32) and video.metadata["original_size"] == (64, 96)
    frame = video.frames[0]
    assert frame.image_CHW.shape == (3, 32, 32) and frame.image_CHW.dtype == torch.uint8
    mask = frame.object_mask()
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert mask.sum() > 0 and xs.max() < 4 and 1 <= ys.min() and ys.max() <= 6
    assert resize_video(video, 32) is video
