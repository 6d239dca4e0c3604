"""Shards or folders: the answer, the training batches a run draws, the sequences evaluation reads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from autosam2.config import DataConfig
from autosam2.data.folder import FolderDataset
from autosam2.data.sources import FolderClips, check_source, is_shard_set, read_sequences, training_batches
from autosam2.errors import DatasetError, SequenceSkipped
from tests.helpers import rewrite_tar, truncate

SHARD = "train-000-00000.tar"


def test_folder_clips_are_resized_windows_with_seeded_augmentation(tiny_root_pristine):
    clips = FolderClips(tiny_root_pristine, "train", clip_len=4, image_size=32, seed=1, stride=4)
    assert len(clips) == 6
    video = clips[4]
    assert video.video_id == "seq2" and [f.frame_index for f in video.frames] == [4, 5, 6, 7]
    assert video.size == (32, 32) and video.frames[0].image_CHW.shape == (3, 32, 32)
    raw = FolderDataset(tiny_root_pristine, "train").load_frame("seq2", 4)
    assert raw.object_mask().any() == video.frames[0].object_mask().any()
    assert clips[4].metadata["augment"] == video.metadata["augment"]
    clips.set_epoch(1)
    assert clips[4].metadata["augment"] != video.metadata["augment"]
    assert torch.equal(clips[4].frames[0].image_CHW, video.frames[0].image_CHW)


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_training_batches_are_the_same_each_time_an_epoch_is_asked_for(
    tiny_root_pristine, tiny_shards_pristine, source
):
    path = tiny_shards_pristine["train"] if source == "shards" else tiny_root_pristine
    assert is_shard_set(path) == (source == "shards")
    data = DataConfig(train=str(path), clip_len=4, batch_size=2, num_workers=0, batches_per_epoch=3)
    batches = training_batches(data, image_size=32, seed=0, rank=0, world_size=1)
    first, again, other = (list(batches.epoch(e)) for e in (0, 0, 1))
    assert batches.per_epoch == 3 and len(first) == 3 and batches.skipped() == 0
    assert first[0].images_TBCHW.shape == (4, 2, 3, 32, 32)
    assert all(torch.equal(a.images_TBCHW, b.images_TBCHW) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a.images_TBCHW, b.images_TBCHW) for a, b in zip(first, other, strict=True))


def test_folder_batches_split_the_windows_between_ranks(tiny_root_pristine):
    data = DataConfig(train=str(tiny_root_pristine), clip_len=4, batch_size=1, num_workers=0)
    ranks = [training_batches(data, 32, 0, rank, 2) for rank in (0, 1)]
    windows = len(FolderClips(tiny_root_pristine, "train", 4, 32, seed=0))
    assert [r.per_epoch for r in ranks] == [windows // 2] * 2
    seen = [{(b.video_ids[0], int(b.frame_indices_TB[0, 0])) for b in r.epoch(0)} for r in ranks]
    assert not seen[0] & seen[1]


def _clips(batches) -> list[tuple]:
    """What identifies each clip of some batches: its sequence, its frames, its augmentation."""
    return [
        (b.video_ids[i], tuple(b.frame_indices_TB[:, i].tolist()), repr(b.augment[i]))
        for b in batches
        for i in range(b.batch_size)
    ]


def test_shard_batches_are_those_of_the_rank_given_whatever_the_environment(
    tiny_shards_pristine, monkeypatch
):
    """Two ranks called in one process, no launcher: each its own share of the global order, the two
    shares together the one epoch a single rank sees (4 samples hold a 4-frame clip)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    data = DataConfig(train=str(tiny_shards_pristine["train"]), clip_len=4, batch_size=1, num_workers=1)
    alone = training_batches(data, 32, seed=0, rank=0, world_size=1)
    whole = _clips(b for _, b in alone.batches(0, 0, epochs=1, global_batch=1))
    assert alone.per_epoch == 4 and len(set(whole)) == 4
    ranks = [training_batches(data, 32, 0, rank, 2) for rank in (0, 1)]
    assert [r.per_epoch for r in ranks] == [2, 2]
    sought = [_clips(b for _, b in r.batches(0, 0, epochs=1, global_batch=2)) for r in ranks]
    epoch = [_clips(r.epoch(0)) for r in ranks]
    assert sought == epoch
    assert not set(sought[0]) & set(sought[1])
    assert sorted(sought[0] + sought[1]) == sorted(whole)
    assert sought[0] == whole[0::2] and sought[1] == whole[1::2]  # step j: positions 2j, 2j + 1
    resampled = replace(data, order="resample", batches_per_epoch=2)
    drawn = [_clips(training_batches(resampled, 32, 0, rank, 2).epoch(0)) for rank in (0, 1)]
    assert drawn[0] != drawn[1]  # each rank draws from its own seeded stream


def test_the_data_line_says_how_many_passes_over_the_set_an_epoch_makes(
    tiny_root_pristine, tiny_shards_pristine
):
    """4 samples of the tiny shards hold a 4-frame clip; its folder has 18 windows of 4 frames."""
    shards = DataConfig(train=str(tiny_shards_pristine["train"]), clip_len=4, batch_size=1, num_workers=0)
    once = training_batches(shards, 32, 0, 0, 2).describe(2, shards)
    assert once == (
        "data: global order, 2 steps of 2 clips per epoch (2 rank(s) x 1); 0 sample(s) that fill no "
        "whole step dropped at each epoch's end"
    )
    longer = replace(shards, batch_size=2, batches_per_epoch=3)
    assert training_batches(longer, 32, 0, 0, 2).describe(2, longer) == (
        "data: global order, 3 steps of 4 clips per epoch (2 rank(s) x 2); 0 sample(s) that fill no "
        "whole step dropped at each epoch's end; data.batches_per_epoch=3 goes beyond the set: an "
        "epoch's 12 clips cycle through the set's 4, 3 passes"
    )
    resampled = replace(longer, order="resample")
    line = training_batches(resampled, 32, 0, 0, 2).describe(2, resampled)
    assert line.startswith("data: resampled order") and line.endswith("the set's 4, 3 passes")
    folder = replace(shards, train=str(tiny_root_pristine), batches_per_epoch=20)
    assert training_batches(folder, 32, 0, 0, 1).describe(1, folder) == (
        "data: polyp_gen folder, 20 steps of 1 clips per epoch (1 rank(s) x 1); "
        "data.batches_per_epoch=20 goes beyond the set: an epoch's 20 clips cycle through the set's 18, "
        "1.11 passes"
    )


def test_a_folder_epoch_longer_than_the_set_cycles_through_it_with_fresh_draws(tiny_root_pristine):
    data = DataConfig(train=str(tiny_root_pristine), clip_len=4, batch_size=1, num_workers=0)
    fits = training_batches(data, 32, 0, 0, 1)
    longer = training_batches(replace(data, batches_per_epoch=22), 32, 0, 0, 1)
    first, again = _clips(longer.epoch(0)), _clips(longer.epoch(0))
    assert len(first) == longer.per_epoch == 22 and first == again
    assert first[:18] == _clips(fits.epoch(0))  # the first pass: what an epoch that fits draws
    windows = [c[:2] for c in first]
    assert len(set(windows[:18])) == 18 and set(windows[18:]) <= set(windows[:18])
    assert windows[18:] != windows[:4]  # a fresh permutation
    assert not set(first[18:]) & set(first[:18])  # fresh augmentations of the windows seen again


def test_a_source_that_cannot_feed_the_run_is_named(tiny_root_pristine, tmp_path):
    with pytest.raises(DatasetError, match=rf"data.train={tmp_path / 'nope'}: neither a shard set"):
        check_source(tmp_path / "nope", "train", 4, key="data.train")
    with pytest.raises(
        DatasetError, match=r"no train sequence has clip_len 40 frames \(the longest has 12\)"
    ):
        check_source(tiny_root_pristine, "train", 40)
    check_source(tiny_root_pristine, "valid")


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_validation_reading_honours_the_error_policy(tiny_root, tiny_shards, capsys, source):
    if source == "shards":
        rewrite_tar(tiny_shards["train"] / SHARD, lambda n, d: b"junk" if n == "seq1__00001.f0000.jpg" else d)
        path = tiny_shards["train"]
    else:
        truncate(tiny_root / "train" / "images" / "seq1" / "frame7.jpg")
        path = tiny_root
    with pytest.raises(DatasetError, match="seq1"):
        [video.load() for video in read_sequences(path, "train", 0, 1)]
    kept = []
    for video in read_sequences(path, "train", 0, 1, on_error="skip"):
        try:
            kept.append((video.video_id, len(video.load())))
        except SequenceSkipped:  # said as a warning; the consumer forgets the sequence
            continue
    assert kept == [("seq2", FolderDataset(tiny_root, "train").num_frames("seq2"))]
    assert "warning: skipped" in capsys.readouterr().err
