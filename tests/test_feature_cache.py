"""The frozen image encoder's features kept per frame: the same numbers as the encoder, keyed by frame
and flip, bounded by the budget, and the trainer's steps unchanged by it; bf16 storage within its stated
tolerance; the disk tier giving back what it stored, within its budget, in a folder of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autosam2.config import ConfigError, DataConfig, LossWeights, ModelConfig
from autosam2.data.transforms import AugmentParams
from autosam2.data.video import ClipBatch
from autosam2.engine.trainer import _cache_figures
from autosam2.losses import clip_losses
from autosam2.model.feature_cache import MARK, DiskTier, FeatureCache, feature_cache, folder_name, frame_keys
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


def model(size: int = S):
    torch.manual_seed(0)
    return build_autosam2(ModelConfig(image_size=size)).train()


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


SMALL = (
    64  # hiera-t at 64 px: three levels of 256 channels, 16x16 + 8x8 + 4x4, 344,064 bytes per frame in fp32
)


def one_step(cache_dtype: torch.dtype) -> tuple[float, torch.Tensor, FeatureCache]:
    """A step on cached features (stored in `cache_dtype`): the loss, every gradient flat, the cache."""
    torch.manual_seed(1)
    images = torch.rand(2, 1, 3, SMALL, SMALL)
    masks = torch.zeros(2, 1, SMALL, SMALL, dtype=torch.bool)
    masks[:, :, 16:32, 20:44] = True
    m = model(SMALL)
    cache = FeatureCache(m.image_encoder, 10**9, dtype=cache_dtype)
    features = cache.encode(images.flatten(0, 1), [("v", 0), ("v", 1)])
    out = m.forward_clip(images, per_frame=False, image_features=features)
    losses = clip_losses(
        out.mask_logits_TBHW, out.iou_TB, out.object_logits_TB, masks, masks.flatten(2).any(2), LossWeights()
    )
    losses["total"].backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    return float(losses["total"].detach()), grads, cache


def test_bf16_storage_halves_a_frames_bytes_and_keeps_a_step_within_its_tolerance():
    """Measured (hiera-t, 64 px): loss 8e-6 relative, gradients 4.2e-4 relative (L2) from the fp32 step;
    the bounds are 1e-4 and 5e-3 (bf16 keeps 8 bits of mantissa: 2^-9 = 2e-3 relative per number)."""
    loss32, grads32, cache32 = one_step(torch.float32)
    loss16, grads16, cache16 = one_step(torch.bfloat16)
    assert cache32.frame_bytes == 344_064 and cache16.frame_bytes * 2 == cache32.frame_bytes
    assert cache16.bytes * 2 == cache32.bytes
    assert all(t.dtype == torch.bfloat16 for t in cache16.entries[("v", 0)])
    assert abs(loss16 - loss32) / abs(loss32) < 1e-4
    drift = float((grads16 - grads32).norm() / grads32.norm())
    assert 0 < drift < 5e-3  # 0 would mean the features were not rounded to bf16
    assert cache16.take_stats()["train/feature_cache_bytes_per_frame"] == 172_032


def test_a_bf16_frame_is_handed_back_in_the_encoders_dtype_the_same_whether_hit_or_just_encoded():
    m = model(SMALL)
    cache = FeatureCache(m.image_encoder, 10**9, dtype=torch.bfloat16)
    image = torch.rand(1, 3, SMALL, SMALL)
    first = cache.encode(image, [("v", 0)])
    again = cache.encode(image, [("v", 0)])
    with torch.no_grad():
        direct = m.image_encoder(image)
    for level in range(3):
        assert first["backbone_fpn"][level].dtype == torch.float32
        assert torch.equal(first["backbone_fpn"][level], again["backbone_fpn"][level])
        rounded = direct["backbone_fpn"][level].to(torch.bfloat16).float()
        assert torch.allclose(first["backbone_fpn"][level], rounded, atol=1e-2, rtol=1e-2)
        assert first["backbone_fpn"][level].is_contiguous(memory_format=cache.layouts[level])


def frame_bytes(encoder: torch.nn.Module) -> int:
    probe = FeatureCache(encoder, 10**9)
    probe.encode(torch.rand(1, 3, SMALL, SMALL), [("p", 0)])
    return probe.frame_bytes


def test_frames_beyond_the_memory_budget_come_back_from_disk_as_stored_and_the_files_go_at_the_end(tmp_path):
    m = model(SMALL)
    encoder = CountingEncoder(m.image_encoder)
    root = tmp_path / "node-local"
    disk = DiskTier(root, folder_name(tmp_path / "run", 0), 10**9)
    cache = FeatureCache(
        encoder, budget_bytes=frame_bytes(m.image_encoder), disk=disk
    )  # memory holds one frame
    assert root.is_dir() and not disk.folder.exists()  # the folder is made at the first frame it takes
    images = torch.rand(3, 3, SMALL, SMALL)
    keys = [("v", i, False, False) for i in range(3)]
    first = cache.encode(images, keys)
    assert list(cache.entries) == keys[:1] and list(disk.files) == keys[1:]
    assert sorted(p.name for p in disk.folder.iterdir()) == ["0.pt", "1.pt", MARK]
    again = cache.encode(images[[2, 1, 0]], keys[::-1])
    assert encoder.images == 3  # all three held: one in memory, two on disk
    for level in range(3):  # fp32 on disk: the stored numbers, bit for bit, in the encoder's layout
        assert torch.equal(again["backbone_fpn"][level], first["backbone_fpn"][level][[2, 1, 0]])
        assert again["backbone_fpn"][level].stride() == first["backbone_fpn"][level].stride()
    stats = cache.take_stats()
    assert stats["train/feature_cache_hit_rate"] == 3 / 6
    assert stats["train/feature_cache_disk_hit_rate"] == 2 / 6
    assert stats["train/feature_cache_disk_gb"] == disk.bytes / 1e9 > 2 * cache.frame_bytes / 1e9
    assert _cache_figures(stats) == " cache hit 50% (disk 33%), 0.34 MB/frame"
    cache.close()
    assert not disk.folder.exists() and list(root.iterdir()) == []


def test_the_disk_budget_is_respected_and_frames_beyond_it_are_encoded_every_time(tmp_path):
    m = model(SMALL)
    encoder = CountingEncoder(m.image_encoder)
    budget = int(
        frame_bytes(m.image_encoder) * 1.5
    )  # one frame's file (its tensors and a little framing), not two
    disk = DiskTier(tmp_path, folder_name(tmp_path / "run", 3), budget)
    cache = FeatureCache(encoder, budget_bytes=0, disk=disk)
    images = torch.rand(3, 3, SMALL, SMALL)
    keys = [("v", i, False, False) for i in range(3)]
    cache.encode(images, keys)
    cache.encode(images, keys)
    assert list(disk.files) == keys[:1] and encoder.images == 3 + 2
    assert 0 < disk.bytes <= budget and disk.bytes == sum(p.stat().st_size for p in disk.folder.glob("*.pt"))
    assert not list(disk.folder.glob("*.part"))  # the refused frame's file is gone
    assert cache.take_stats()["train/feature_cache_disk_hit_rate"] == 1 / 6
    cache.close()


def test_a_full_disk_stops_the_disk_tier_and_the_run_goes_on_encoding(tmp_path, monkeypatch, capsys):
    import errno

    m = model(SMALL)
    encoder = CountingEncoder(m.image_encoder)
    disk = DiskTier(tmp_path, folder_name(tmp_path / "run", 0), 10**9)
    cache = FeatureCache(encoder, budget_bytes=0, disk=disk)

    def full(obj, path):
        Path(path).write_bytes(b"half")  # a write the disk cut short
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    images = torch.rand(2, 3, SMALL, SMALL)
    keys = [("v", i, False, False) for i in range(2)]
    first = cache.encode(images, keys)
    again = cache.encode(images, keys)  # nothing held: encoded again, the same numbers
    assert encoder.images == 4 and not disk.files and disk.full
    assert all(torch.equal(a, b) for a, b in zip(first["backbone_fpn"], again["backbone_fpn"], strict=True))
    assert not list(disk.folder.glob("*.part")) and not list(disk.folder.glob("*.pt"))
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "encoded every time from now on" in err
    cache.close()
    assert not disk.folder.exists()


def test_bf16_on_disk_takes_half_the_bytes(tmp_path):
    sizes = []
    for dtype in ("fp32", "bf16"):
        data = DataConfig(
            feature_cache_dtype=dtype, feature_cache_gb=0, feature_cache_dir=str(tmp_path / dtype)
        )
        cache = feature_cache(model(SMALL).image_encoder, data, False, None, (tmp_path / "run", 0))
        cache.encode(torch.rand(2, 3, SMALL, SMALL), [("v", 0), ("v", 1)])
        sizes.append(cache.disk.bytes)
        cache.close()
    assert sizes[0] / sizes[1] == pytest.approx(2, rel=0.01)


def test_a_bad_cache_folder_is_one_line_before_anything_is_written(tmp_path):
    encoder = model(SMALL).image_encoder
    a_file = tmp_path / "file"
    a_file.write_text("mine")

    def build(folder):
        data = DataConfig(feature_cache_dir=str(folder))
        return feature_cache(encoder, data, False, None, (tmp_path / "run", 0))

    with pytest.raises(ConfigError, match=f"^data.feature_cache_dir {a_file} is a file, not a folder$"):
        build(a_file)
    with pytest.raises(ConfigError, match="cannot be made: Not a directory$"):
        build(a_file / "below")
    assert a_file.read_text() == "mine"


def test_a_cache_folder_on_a_read_only_disk_is_one_line(tmp_path):
    import subprocess

    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=True)
    try:
        data = DataConfig(feature_cache_dir=str(readonly))
        with pytest.raises(ConfigError, match=f"^data.feature_cache_dir {readonly} is not writable$"):
            feature_cache(model(SMALL).image_encoder, data, False, None, (tmp_path / "run", 0))
        with pytest.raises(ConfigError, match="cannot be made: Read-only file system$"):
            feature_cache(
                model(SMALL).image_encoder,
                DataConfig(feature_cache_dir=str(readonly / "below")),
                False,
                None,
                (tmp_path / "run", 0),
            )
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)


def test_a_folder_of_the_users_is_never_deleted_and_a_stale_one_of_ours_is_replaced(tmp_path):
    name = folder_name(tmp_path / "run", 0)
    theirs = tmp_path / name
    theirs.mkdir()
    (theirs / "0.pt").write_text("the user's")
    with pytest.raises(ConfigError, match=f"{theirs} exists and is not a feature cache folder of ours"):
        DiskTier(tmp_path, name, 10**9)
    assert (theirs / "0.pt").read_text() == "the user's"
    (theirs / MARK).write_text("")  # a crashed run's folder: ours, its frame files stale
    (theirs / "notes.txt").write_text("kept")
    (theirs / "7.part").write_text("half-written")
    cache = FeatureCache(model(SMALL).image_encoder, 0, disk=DiskTier(tmp_path, name, 10**9))
    cache.encode(torch.rand(1, 3, SMALL, SMALL), [("v", 0)])
    assert sorted(p.name for p in theirs.iterdir()) == ["0.pt", MARK, "notes.txt"]
    assert len(torch.load(theirs / "0.pt", weights_only=True)) == 3  # this run's frame, not the stale one
    cache.close()
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]  # what is not ours stays


def test_a_link_in_the_cache_folders_place_or_as_the_cache_folder_is_one_line_and_nothing_is_touched(
    tmp_path,
):
    name = folder_name(tmp_path / "run", 0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MARK).write_text("")  # even marked, what a link leads to is not emptied
    (elsewhere / "0.pt").write_text("the user's")
    root = tmp_path / "root"
    root.mkdir()
    (root / name).symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=f"^data.feature_cache_dir: {root / name} is a link, not a feature"):
        DiskTier(root, name, 10**9)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["0.pt", MARK]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(
        ConfigError, match=f"^data.feature_cache_dir {dangling} is a link to nothing, not a folder$"
    ):
        DiskTier(dangling, name, 10**9)
