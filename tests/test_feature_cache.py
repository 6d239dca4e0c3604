"""The frozen image encoder's features kept per frame: the same numbers as the encoder, keyed by frame
and flip, bounded by the budget, and the trainer's steps unchanged by it."""

from __future__ import annotations

import torch

from autosam2.config import LossWeights, ModelConfig
from autosam2.data.transforms import AugmentParams
from autosam2.data.video import ClipBatch
from autosam2.losses import clip_losses
from autosam2.model.feature_cache import FeatureCache, frame_keys
from autosam2.model.sam2_builder import build_autosam2

S = 128


class CountingEncoder(torch.nn.Module):
    """The model's image encoder, counting the images it encodes."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.images = encoder, 0

    def forward(self, images):
        self.images += images.shape[0]
        return self.encoder(images)


def model():
    torch.manual_seed(0)
    return build_autosam2(ModelConfig(image_size=S)).train()


def clip_batch(videos: list[str], starts: list[int], flips: list[bool]) -> ClipBatch:
    t, b = 2, len(videos)
    return ClipBatch(
        torch.zeros(t, b, 3, S, S, dtype=torch.uint8),
        torch.zeros(t, b, S, S, dtype=torch.bool),
        torch.zeros(t, b, dtype=torch.bool),
        torch.tensor([[s + i for s in starts] for i in range(t)]),
        videos,
        [AugmentParams(hflip=f) for f in flips],
    )


def test_keys_follow_the_batchs_time_major_images_and_their_flips():
    keys = frame_keys(clip_batch(["a", "b"], [3, 7], [False, True]))
    assert keys == [
        ("a", 3, False, False),
        ("b", 7, True, False),
        ("a", 4, False, False),
        ("b", 8, True, False),
    ]
    plain = clip_batch(["a"], [0], [False])
    plain.augment = None
    assert frame_keys(plain) == [("a", 0, False, False), ("a", 1, False, False)]


def test_cached_features_are_the_encoders_and_a_held_frame_is_not_encoded_again():
    m = model()
    encoder = CountingEncoder(m.image_encoder)
    cache = FeatureCache(encoder, budget_bytes=10**9)
    images = torch.randn(3, 3, S, S)
    keys = [("v", 0, False, False), ("v", 1, False, False), ("v", 0, True, False)]
    with torch.no_grad():
        direct = m.image_encoder(images)
    first = cache.encode(images, keys)
    assert encoder.images == 3
    again = cache.encode(images[[1, 0]], keys[1::-1])
    assert encoder.images == 3  # both held
    close = dict(atol=1e-5, rtol=1e-5)  # a frame alone vs three at once: equal but for the threads' sums
    for level in range(3):
        assert torch.allclose(first["backbone_fpn"][level], direct["backbone_fpn"][level], **close)
        assert torch.equal(first["vision_pos_enc"][level], direct["vision_pos_enc"][level])
        assert torch.equal(again["backbone_fpn"][level], first["backbone_fpn"][level][[1, 0]])
    assert first["vision_features"] is first["backbone_fpn"][-1]
    stats = cache.take_stats()
    assert stats["train/feature_cache_hit_rate"] == 2 / 5
    assert stats["train/feature_cache_gb"] == cache.bytes / 1e9 > 0
    assert cache.take_stats()["train/feature_cache_hit_rate"] == 0.0  # counts start again


def test_frames_beyond_the_budget_are_encoded_every_time():
    m = model()
    encoder = CountingEncoder(m.image_encoder)
    images = torch.randn(2, 3, S, S)
    keys = [("v", 0, False, False), ("v", 1, False, False)]
    one = FeatureCache(encoder, budget_bytes=0)
    one.encode(images, keys)
    one.encode(images, keys)
    assert encoder.images == 4 and one.bytes == 0 and not one.entries
    probe = FeatureCache(m.image_encoder, budget_bytes=10**9)
    probe.encode(images[:1], keys[:1])
    room_for_one = FeatureCache(encoder, budget_bytes=probe.bytes)
    room_for_one.encode(images, keys)
    room_for_one.encode(images, keys)
    assert encoder.images == 4 + 3 and list(room_for_one.entries) == keys[:1]


def test_a_step_on_cached_features_equals_a_step_through_the_encoder():
    images = torch.randn(2, 1, 3, S, S)
    masks = torch.zeros(2, 1, S, S, dtype=torch.bool)
    masks[:, :, 40:70, 50:90] = True
    grads = []
    for cached in (False, True):
        m = model()
        features = None
        if cached:
            features = FeatureCache(m.image_encoder, 10**9).encode(images.flatten(0, 1), [("v", 0), ("v", 1)])
        out = m.forward_clip(images, per_frame=False, image_features=features)
        losses = clip_losses(
            out.mask_logits_TBHW,
            out.iou_TB,
            out.object_logits_TB,
            masks,
            masks.flatten(2).any(2),
            LossWeights(),
        )
        losses["total"].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_frames_another_rank_encoded_are_kept_and_not_encoded_here():
    m = model()
    encoder = CountingEncoder(m.image_encoder)
    theirs = FeatureCache(m.image_encoder, 10**9)
    image = torch.randn(1, 3, S, S)
    elsewhere = ("w", 9, False, False)
    theirs.encode(image, [elsewhere])
    sent = []

    def share(obj):  # an all-gather between this rank and one whose step encoded `elsewhere`
        sent.append(sorted(obj))
        return [obj, {elsewhere: theirs.entries[elsewhere]}]

    mine = FeatureCache(encoder, 10**9, share=share)
    mine.encode(torch.randn(1, 3, S, S), [("v", 0, False, False)])
    assert encoder.images == 1 and set(mine.entries) == {("v", 0, False, False), elsewhere}
    out = mine.encode(image, [elsewhere])
    assert encoder.images == 1  # the other rank's frame is a hit
    assert torch.equal(out["backbone_fpn"][0][0], theirs.entries[elsewhere][0])
    assert sent == [[("v", 0, False, False)], []]  # each step shares only what it encoded
