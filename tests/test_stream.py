"""The streaming clip pipeline: round trip, windows, determinism, equal batches, bad shards."""

from dataclasses import replace

import pytest
import torch

from autosam2.config import DataConfig
from autosam2.data.folder import FolderDataset
from autosam2.data.order import usable_samples
from autosam2.data.sample_format import ShardError
from autosam2.data.stream import ClipStream, make_loader, read_samples
from tests.helpers import rewrite_tar, truncate

SHARD = "train-000-00000.tar"


def batches(stream: ClipStream, workers: int = 0) -> list:
    return list(make_loader(stream, num_workers=workers))


def test_evaluation_without_names_splits_the_shards_at_the_rank_given(tiny_shards_pristine, monkeypatch):
    """One shard: rank 0 of 2 reads it all, rank 1 nothing, whatever RANK and WORLD_SIZE say."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tiny_shards_pristine["valid"]
    assert [
        v.video_id for v in ClipStream(path, "eval", DataConfig(), None, 0, rank=0, world_size=2).sequences()
    ] == ["seq3"]
    assert [
        v.video_id for v in ClipStream(path, "eval", DataConfig(), None, 0, rank=1, world_size=2).sequences()
    ] == []
    assert [
        v.video_id for v in ClipStream(path, "eval", DataConfig(), None, seed=0).sequences()
    ] == []  # the environment's rank 1
    with pytest.raises(ValueError, match="need both rank and world_size"):
        ClipStream(path, "eval", DataConfig(), None, 0, rank=2, world_size=2)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_round_trip_gives_the_folder_readers_bytes_and_masks(tiny_root_pristine, tiny_shards_pristine, split):
    folder = FolderDataset(tiny_root_pristine, split)
    stream = ClipStream(tiny_shards_pristine[split], "eval", DataConfig(), 64, seed=0)
    seen = []
    for batch in batches(stream, workers=2):
        (name,) = batch.video_ids
        seen.append(name)
        video = folder.load_sequence(name)
        assert batch.images_TBCHW.shape[0] == len(video)
        for t, frame in enumerate(video.frames):
            assert torch.equal(batch.images_TBCHW[t, 0], frame.image_CHW)
            assert torch.equal(batch.masks_TBHW[t, 0], frame.object_mask())
            assert int(batch.frame_indices_TB[t, 0]) == t
    assert sorted(seen) == sorted(folder.sequence_names)
    # and the frame members are the very bytes of the files
    manifest_urls = stream.urls
    files = {f.image.read_bytes() for s in folder.sequences.values() for f in s.frames}
    members = [
        v
        for sample in read_samples(({"url": u} for u in manifest_urls), {}, "raise", print)
        for k, v in sample.items()
        if k.endswith(".jpg")
    ]
    assert len(members) == len(files) and set(members) == files


def test_training_batches_are_windows_inside_one_chunk(tiny_shards_pristine):
    cfg = DataConfig(clip_len=4, batch_size=2, batches_per_epoch=6, shuffle_buffer=4)
    out = batches(ClipStream(tiny_shards_pristine["train"], "train", cfg, 32, seed=7))
    assert len(out) == 6
    for batch in out:
        assert batch.images_TBCHW.shape == (4, 2, 3, 32, 32) and batch.images_TBCHW.dtype == torch.uint8
        assert batch.masks_TBHW.shape == (4, 2, 32, 32) and len(batch.augment) == 2
        for b in range(2):
            idx = batch.frame_indices_TB[:, b].tolist()
            assert idx == list(range(idx[0], idx[0] + 4))
            assert idx[0] // 5 == idx[-1] // 5  # chunks of 5 frames: the window never crosses one
            assert idx[0] < 10  # the 2-frame last chunk cannot hold a window


def _fingerprint(out: list) -> list:
    return [
        (b.video_ids, b.frame_indices_TB.tolist(), b.augment, b.images_TBCHW.float().mean().item())
        for b in out
    ]


def test_deterministic_for_seed_epoch_rank_and_worker(tiny_shards_pristine, monkeypatch):
    cfg = DataConfig(clip_len=3, batch_size=1, batches_per_epoch=8)
    path = tiny_shards_pristine["train"]
    first = _fingerprint(batches(ClipStream(path, "train", cfg, 32, seed=3), workers=2))
    assert first == _fingerprint(batches(ClipStream(path, "train", cfg, 32, seed=3), workers=2))
    other_epoch = ClipStream(path, "train", cfg, 32, seed=3)
    other_epoch.set_epoch(1)
    assert _fingerprint(batches(other_epoch, workers=2)) != first
    assert _fingerprint(batches(ClipStream(path, "train", cfg, 32, seed=4), workers=2)) != first
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _fingerprint(batches(ClipStream(path, "train", cfg, 32, seed=3), workers=2)) != first


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_every_epoch_has_the_configured_number_of_batches(tiny_shards_pristine, workers):
    cfg = DataConfig(clip_len=3, batch_size=2, batches_per_epoch=7)
    assert len(batches(ClipStream(tiny_shards_pristine["train"], "train", cfg, 32, seed=0), workers)) == 7


def test_default_epoch_length_divides_samples_over_ranks(tiny_shards_pristine):
    resampled = DataConfig(clip_len=3, batch_size=2, order="resample")
    stream = ClipStream(tiny_shards_pristine["train"], "train", resampled, 256, seed=0)
    assert (
        stream.batches_per_rank(1) == 3
        and stream.batches_per_rank(2) == 1
        and stream.batches_per_rank(16) == 1
    )
    # the global order counts the samples that hold a clip, and drops what fills no whole step
    stream = ClipStream(
        tiny_shards_pristine["train"], "train", DataConfig(clip_len=3, batch_size=2), 256, seed=0
    )
    usable = sum(len(u) for u in usable_samples(stream.manifest, 3))
    assert 0 < usable < stream.manifest["totals"]["samples"]
    for ranks in (1, 2, 16):
        assert stream.batches_per_rank(ranks) == usable // (2 * ranks)
        assert stream.global_order.dropped(2 * ranks) == usable % (2 * ranks)


def test_clip_longer_than_samples_is_refused(tiny_shards_pristine):
    with pytest.raises(ShardError, match="samples hold 5 frames, fewer than clip_len 8"):
        ClipStream(tiny_shards_pristine["train"], "train", DataConfig(clip_len=8), 256, seed=0)


CFG = DataConfig(clip_len=3, batch_size=1, batches_per_epoch=30, shuffle_buffer=1)


def stream_of(path, mode: str, cfg: DataConfig = CFG) -> ClipStream:
    return ClipStream(path, mode, cfg, 32, seed=0)


def test_truncated_shard_names_shard_and_key(tiny_shards):
    truncate(tiny_shards["train"] / SHARD, 0.55)
    with pytest.raises(
        ShardError, match=rf"{SHARD}: tar is truncated or corrupt (after|at) sample seq\d__0000\d"
    ):
        batches(stream_of(tiny_shards["train"], "train"))


def test_corrupted_member_names_shard_key_and_member(tiny_shards):
    rewrite_tar(
        tiny_shards["valid"] / "valid-000-00000.tar",
        lambda n, d: b"junk" if n == "seq3__00001.f0002.jpg" else d,
    )
    with pytest.raises(
        ShardError, match=r"valid-000-00000\.tar: sample seq3__00001: f0002\.jpg: cannot decode image"
    ):
        batches(stream_of(tiny_shards["valid"], "eval"))


def test_missing_mask_member_names_shard_and_key(tiny_shards):
    rewrite_tar(tiny_shards["train"] / SHARD, lambda n, d: None if n.startswith("seq2__00001.m") else d)
    with pytest.raises(ShardError, match=rf"{SHARD}: sample seq2__00001: member m000\d\.png is missing"):
        batches(stream_of(tiny_shards["train"], "train", replace(CFG, clip_len=5)))


def test_skip_policy_counts_and_goes_on(tiny_shards):
    rewrite_tar(tiny_shards["train"] / SHARD, lambda n, d: None if n.startswith("seq2__00001.m") else d)
    cfg = replace(CFG, clip_len=5, on_error="skip", batches_per_epoch=12)
    stream = stream_of(tiny_shards["train"], "train", cfg)
    out = batches(stream, workers=2)
    assert len(out) == 12
    for b in out:  # the broken chunk (seq2 frames 5..9) never arrives
        assert not (b.video_ids[0] == "seq2" and int(b.frame_indices_TB[0, 0]) == 5)
    assert stream.skipped > 0


def test_skip_policy_in_evaluation_drops_the_incomplete_sequence(tiny_shards):
    rewrite_tar(tiny_shards["train"] / SHARD, lambda n, d: b"junk" if n == "seq1__00001.f0000.jpg" else d)
    stream = ClipStream(tiny_shards["train"], "eval", DataConfig(on_error="skip"), 64, seed=0)
    out = batches(stream, workers=2)
    assert [b.video_ids for b in out] == [["seq2"]]
    assert stream.skipped == 3  # the broken chunk, then the two chunks of seq1 that arrived


def test_skip_policy_counts_the_unread_rest_of_a_truncated_shard(tiny_shards):
    truncate(tiny_shards["valid"] / "valid-000-00000.tar", 0.4)
    stream = ClipStream(tiny_shards["valid"], "eval", DataConfig(on_error="skip"), 64, seed=0)
    assert batches(stream) == []
    assert stream.skipped >= 2


@pytest.mark.parametrize("workers", [0, 2])
def test_a_workers_error_arrives_as_itself_in_one_line(tiny_shards, workers):
    truncate(tiny_shards["train"] / SHARD, 0.55)
    with pytest.raises(ShardError) as err:
        batches(stream_of(tiny_shards["train"], "train"), workers=workers)
    assert "\n" not in str(err.value) and "DataLoader worker" not in str(err.value)
    assert str(err.value).startswith(str(tiny_shards["train"] / SHARD))


UNREADABLE = {
    "every shard unreadable": lambda path: path.write_bytes(b""),
    "every record broken": lambda path: rewrite_tar(path, lambda n, d: b"{" if n.endswith(".json") else d),
}


@pytest.mark.parametrize("damage", sorted(UNREADABLE))
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_policy_stops_when_every_sample_has_failed(tiny_shards, damage, workers):
    for shard in tiny_shards["train"].glob("*.tar"):
        UNREADABLE[damage](shard)
    cfg = replace(CFG, on_error="skip", batches_per_epoch=1000)
    stream = stream_of(tiny_shards["train"], "train", cfg)
    usable = sum(len(u) for u in usable_samples(stream.manifest, cfg.clip_len))  # those that hold a clip
    with pytest.raises(
        ShardError, match=rf"all {usable} samples failed to read since the last good clip"
    ) as err:
        batches(stream, workers=workers)
    assert f"first error: {tiny_shards['train'] / SHARD}" in str(err.value)


def test_skip_policy_is_not_stopped_by_a_set_with_good_samples(tiny_shards):
    """Five of six samples broken: every draw of the good one resets the count, so all batches come."""
    rewrite_tar(
        tiny_shards["train"] / SHARD,
        lambda n, d: b"{" if n.endswith(".json") and not n.startswith("seq1__00000") else d,
    )
    cfg = replace(CFG, on_error="skip", batches_per_epoch=20)
    stream = stream_of(tiny_shards["train"], "train", cfg)
    out = batches(stream, workers=2)
    assert len(out) == 20 and {b.video_ids[0] for b in out} == {"seq1"}
    assert stream.skipped > 0


def test_no_sequence_long_enough_for_a_clip_is_refused(tmp_path):
    from autosam2.data.synthetic import SynthSpec, write_dataset
    from shards.writer import build

    write_dataset(tmp_path / "pg", SynthSpec(train_sequences=2, valid_sequences=1, frames=3, size=32, seed=1))
    build(tmp_path / "pg", "train", tmp_path / "shards", frames_per_sample=8)
    with pytest.raises(ShardError, match="no sequence has clip_len 4 frames \\(the longest has 3\\)"):
        ClipStream(tmp_path / "shards", "train", DataConfig(clip_len=4), 256, seed=0)


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_ranks_take_whole_sequences_in_turn_and_skip_the_others_undecoded(
    tiny_shards, tiny_root, monkeypatch, source
):
    import json

    import autosam2.data.stream as stream_module
    from autosam2.data.sources import read_sequences

    data = tiny_shards["train"] if source == "shards" else tiny_root
    everything = [v.video_id for v in read_sequences(data, "train", 0, 1)]
    assert len(everything) == 2
    if source == "shards":  # both sequences share one shard: a rank still decodes only its own
        shards = json.loads((data / "manifest.json").read_text())["shards"]
        assert len(shards) == 1
    decoded: list[tuple[str, int]] = []
    real = stream_module.decode_frame
    monkeypatch.setattr(
        stream_module, "decode_frame", lambda s, r, i: (decoded.append((s["__key__"], i)), real(s, r, i))[1]
    )
    shares = [[v.load().video_id for v in read_sequences(data, "train", rank, 2)] for rank in (0, 1)]
    assert shares == [[name] for name in sorted(everything)]
    if source == "shards":
        keys = [key for key, _ in decoded]
        assert keys and all(key.startswith(tuple(sorted(everything))) for key in keys)
        assert {key.split("__")[0] for key in keys} == set(everything)  # each by its own rank only
        assert len(decoded) == len(set(decoded))  # every frame decoded once
