"""The global training order: one sequence of samples per (seed, epoch) whatever the world size and the
loader workers, resumed at any position by seeking, remainder dropped so every rank has its batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from autosam2.config import DataConfig
from autosam2.data.order import GlobalOrder, MixOrder, TarIndex, usable_samples
from autosam2.data.sample_format import read_manifest
from autosam2.data.sources import training_batches
from autosam2.data.stream import ClipStream, make_loader
from autosam2.data.synthetic import SynthSpec, write_dataset

CLIP = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 sequences of 13 frames in chunks of 4 (4, 4, 4, 1 frames): 30 samples hold a 3-frame clip,
    10 do not; one sequence per shard, so 10 shards."""
    from shards.writer import build

    base = tmp_path_factory.mktemp("order")
    write_dataset(base / "pg", SynthSpec(train_sequences=10, valid_sequences=1, frames=13, size=32, seed=11))
    build(base / "pg", "train", base / "train", frames_per_sample=4, max_shard_mb=0.0001)
    return base / "train"


def clip_id(batch, i: int) -> tuple:
    """What identifies clip i of a batch: its sequence, its frames, its augmentation."""
    return (
        batch.video_ids[i],
        tuple(batch.frame_indices_TB[:, i].tolist()),
        repr(batch.augment[i]),
    )


def global_steps(shards: Path, ranks: int, workers: int, batch: int, start=(0, 0), epochs: int = 1, **cfg):
    """Step by step, the clips every rank received (rank 0's first): what the whole job consumed."""
    config = DataConfig(clip_len=CLIP, batch_size=batch, shuffle_shards=3, **cfg)
    per_rank = []
    for rank in range(ranks):
        stream = ClipStream(shards, "train", config, 32, seed=5)
        stream.start_at(start[0], start[1], epochs)
        with (
            pytest.MonkeyPatch.context() as env
        ):  # the rank and world size the stream reads, as under torchrun
            env.setenv("RANK", str(rank))
            env.setenv("WORLD_SIZE", str(ranks))
            per_rank.append(list(make_loader(stream, num_workers=workers)))
    assert len({len(batches) for batches in per_rank}) == 1, "every rank gets the same number of batches"
    return [
        [clip_id(b, i) for b in step for i in range(b.batch_size)] for step in zip(*per_rank, strict=True)
    ]


def test_an_epoch_is_a_permutation_of_the_samples_that_hold_a_clip_shuffled_within_windows(shards):
    manifest = read_manifest(shards)
    order = GlobalOrder(manifest, CLIP, seed=5, window=3)
    usable = usable_samples(manifest, CLIP)
    assert order.total == 30 and sum(len(u) for u in usable) == 30
    epochs = [[order.at(e, p) for p in range(order.total)] for e in range(3)]
    everything = sorted((s, i) for s, idx in enumerate(usable) for i in idx)
    assert all(sorted(e) == everything for e in epochs)  # each sample once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    # a window of 3 shards (9 samples): its positions draw only from its own shards
    for e in epochs:
        for w in range(0, 27, 9):
            assert len({s for s, _ in e[w : w + 9]}) == 3
    assert GlobalOrder(manifest, CLIP, seed=5, window=3).at(1, 7) == epochs[1][7]  # from the seed alone


@pytest.mark.parametrize("ranks,workers", [(1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_any_world_size_and_worker_count_consume_the_same_global_sequence(shards, ranks, workers):
    reference = global_steps(shards, ranks=1, workers=1, batch=4)
    assert len(reference) == 7 and len({c for step in reference for c in step}) == 28  # 2 of 30 dropped
    assert global_steps(shards, ranks=ranks, workers=workers, batch=4 // ranks) == reference


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("ranks,batch", [(4, 1), (1, 2), (2, 3)])
def test_a_run_stopped_at_any_step_resumes_at_another_world_size_with_the_same_samples(
    shards, k, ranks, batch
):
    """2 ranks x 3 clips stop after step k; the resumed run (other ranks, other batch) goes on at sample
    6k: over the epoch the keys of the uninterrupted run, none twice, none left out (30 samples: no
    remainder for a step of 6, 4 does leave 2, 2 does not)."""
    whole = [c for step in global_steps(shards, ranks=2, workers=1, batch=3) for c in step]
    before = whole[: 6 * k]
    after = [
        c
        for step in global_steps(shards, ranks=ranks, workers=2, batch=batch, start=(0, 6 * k))
        for c in step
    ]
    dropped = (30 - 6 * k) % (ranks * batch)
    assert len(after) == 30 - 6 * k - dropped
    assert Counter(before + after) == Counter(whole[: 30 - dropped]), "the same clips, each once"
    assert after == whole[6 * k : 30 - dropped]  # the very same order, positions and augmentations


def test_a_resume_reads_no_shard_before_its_position(shards, monkeypatch):
    """Seeking to the last step: only the shards of its samples are opened, none of the 27 positions
    before it is read; inside those shards other samples are skipped over, not read."""
    opened, read = [], []
    index_of, real_read = TarIndex._index_of, TarIndex.read
    monkeypatch.setattr(TarIndex, "_index_of", lambda self, url: opened.append(url) or index_of(self, url))
    monkeypatch.setattr(
        TarIndex, "read", lambda self, url, key: read.append(key) or real_read(self, url, key)
    )
    config = DataConfig(clip_len=CLIP, batch_size=3, shuffle_shards=3)
    stream = ClipStream(shards, "train", config, 32, seed=5)
    stream.start_at(0, 27, 1)
    (last,) = list(make_loader(stream, num_workers=0))
    order = stream.global_order
    wanted = [order.at(0, p) for p in range(27, 30)]
    assert read == [stream.expected[stream.urls[s]][i] for s, i in wanted]
    assert sorted(set(opened)) == sorted({stream.urls[s] for s, _ in wanted})
    assert last.batch_size == 3


def test_epochs_follow_each_other_in_one_loader_and_an_epoch_longer_than_the_set_cycles(shards):
    steps = global_steps(shards, ranks=2, workers=2, batch=2, epochs=2)
    assert len(steps) == 2 * 7  # 30 // 4 steps in each epoch, the loader's workers kept across them
    first, second = steps[:7], steps[7:]
    assert first != second and Counter(c[:2] for s in first for c in s) != Counter()
    # batches_per_epoch beyond the set: further passes, each a fresh permutation of every sample
    long = global_steps(shards, ranks=1, workers=1, batch=5, batches_per_epoch=12)
    assert len(long) == 12
    seqs = Counter(c[0] for step in long for c in step)
    assert sum(seqs.values()) == 60 and all(n == 6 for n in seqs.values())  # 2 passes, 3 samples each


def test_training_batches_drop_the_remainder_and_name_a_set_too_small_for_one_step(shards):
    data = DataConfig(train=str(shards), clip_len=CLIP, batch_size=4, num_workers=0)
    batches = training_batches(data, 32, seed=0, rank=0, world_size=2)
    assert batches.per_epoch == 3 and batches.dropped == 30 % 8
    tagged = list(batches.batches(0, 16, epochs=2, global_batch=8))  # resumed after 2 steps of epoch 0
    assert [e for e, _ in tagged] == [0, 1, 1, 1]
    from autosam2.errors import DatasetError

    with pytest.raises(
        DatasetError, match=r"30 samples hold a 3-frame clip, fewer than one step takes \(8 rank"
    ):
        training_batches(data, 32, seed=0, rank=0, world_size=8)


# a mix of shard sets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def singles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 one-frame sequences (single frames, as PolypGen's), one shard each: 6 one-frame samples."""
    from shards.writer import build

    base = tmp_path_factory.mktemp("singles")
    write_dataset(base / "pg", SynthSpec(train_sequences=6, valid_sequences=1, frames=2, size=32, seed=12))
    for folder in (base / "pg" / "train").glob("*/seq*"):
        sorted(folder.iterdir())[-1].unlink()  # frame2 of images and masks: one frame is left
    build(base / "pg", "train", base / "train", frames_per_sample=4, max_shard_mb=0.0001)
    return base / "train"


def mix_steps(
    sets: list[Path], ranks: int, batch: int, start=(0, 0), epochs: int = 1, workers: int = 1, **cfg
):
    """Step by step, the clips of a mix every rank received (rank 0's first), and each step's frames."""
    config = DataConfig(
        train=[str(s) for s in sets],
        clip_len=CLIP,
        batch_size=batch,
        shuffle_shards=3,
        num_workers=workers,
        **cfg,
    )
    per_rank = [
        [b for _, b in training_batches(config, 32, 5, rank, ranks).batches(*start, epochs, ranks * batch)]
        for rank in range(ranks)
    ]
    assert len({len(batches) for batches in per_rank}) == 1, "every rank gets the same number of batches"
    return [
        ([clip_id(b, i) for b in step for i in range(b.batch_size)], step[0].num_frames)
        for step in zip(*per_rank, strict=True)
    ]


def test_a_mix_draws_each_step_from_one_source_by_weight_and_each_goes_on_along_its_own_order():
    order = MixOrder([1.0, 3.0, 0.0], seed=2, steps_per_epoch=400, global_batch=4)
    drawn, before = order.sources(0)
    assert 0.68 < (drawn == 1).mean() < 0.82 and not (drawn == 2).any()  # weight 3 of 4; 0: never
    short = MixOrder([1.0, 3.0, 0.0], seed=2, steps_per_epoch=10, global_batch=4)
    assert list(short.sources(0)[0]) == list(drawn[:10])  # draw j is the same whatever the epoch's length
    assert list(order.sources(1)[0]) != list(drawn)  # each epoch its own draws
    steps = list(order.steps(0, 0, 1))
    for source in (0, 1):
        assert [s.at for s in steps if s.source == source] == [4 * i for i in range((drawn == source).sum())]
    assert list(order.steps(0, 4 * 37, 2)) == steps[37:] + list(order.steps(1, 0, 2))


@pytest.mark.parametrize("ranks,workers", [(2, 1), (2, 2), (4, 1)])
def test_a_mix_gives_any_world_size_and_worker_count_the_same_clips_at_each_step(
    shards, singles, ranks, workers
):
    """Sequences (3-frame clips) and single frames (one-frame clips) weighted 1:3, 4 clips a step: an
    epoch of 30 // 4 + 6 // 4 = 8 steps; the single frames cycle through their order, a fresh
    permutation each pass."""
    reference = mix_steps([shards, singles], ranks=1, batch=4, train_weights=[1, 3])
    assert mix_steps([shards, singles], ranks, 4 // ranks, workers=workers, train_weights=[1, 3]) == reference
    assert len(reference) == 8
    for clips, frames in reference:
        (source,) = {c[0].split(":")[0] for c in clips}  # the whole step from one source
        assert frames == {"0": CLIP, "1": 1}[source]
    single = [c[0] for clips, frames in reference if frames == 1 for c in clips]
    assert len(single) > 6 and all(len(set(single[i : i + 6])) == 6 for i in range(0, len(single) - 5, 6))
    seq = [c[:2] for clips, frames in reference if frames == CLIP for c in clips]
    assert len(set(seq)) == len(seq)  # the sequences' own order, not yet through one pass


@pytest.mark.parametrize("k", [1, 5, 8, 11])
def test_a_mixed_run_stopped_at_any_step_resumes_at_another_world_size_with_the_same_clips(
    shards, singles, k
):
    """2 ranks x 2 clips stop after step k (8 steps an epoch: 8 is the epoch's end); 4 ranks x 1 and 1 x
    4 go on with the very clips of the uninterrupted run, through the next epoch."""
    whole = mix_steps([shards, singles], ranks=2, batch=2, epochs=2, train_weights=[2, 1])
    assert len(whole) == 16 and whole[:8] != whole[8:]
    start = divmod(k, 8)
    for ranks, batch in ((4, 1), (1, 4)):
        after = mix_steps([shards, singles], ranks, batch, (start[0], 4 * start[1]), 2, train_weights=[2, 1])
        assert after == whole[k:]


def test_a_mix_resumed_at_another_step_size_goes_on_at_whole_steps_of_that_size(shards, singles):
    from autosam2.engine.checkpoint import LoopState

    config = DataConfig(train=[str(shards), str(singles)], clip_len=CLIP, batch_size=1, num_workers=0)
    batches = training_batches(config, 32, 5, 0, 2)
    assert batches.per_epoch == 30 // 2 + 6 // 2
    saved = LoopState(step=3, epoch=0, batch=3, sample=12, world_size=4, batch_size=1)
    resumed = batches.resume(saved, world_size=2, batch_size=1)
    assert (resumed.batch, resumed.sample) == (6, 12)
    assert "the mix draws a source per step of 2 clips" in resumed.order and "step 6 of 18" in resumed.order
    odd = batches.resume(LoopState(step=1, epoch=0, batch=1, sample=3, world_size=3, batch_size=1), 2, 1)
    assert (odd.batch, odd.sample) == (1, 2)  # whole steps of this run
    same = batches.resume(LoopState(step=6, epoch=0, batch=6, sample=12, world_size=1, batch_size=2), 2, 1)
    assert same.order.startswith("the global sample order goes on unchanged")


def test_the_data_line_names_each_source_of_a_mix_its_weight_and_its_samples(shards, singles):
    config = DataConfig(train=[str(shards), str(singles)], train_weights=[3, 1], clip_len=CLIP, num_workers=0)
    line = training_batches(config, 32, 0, 0, 2).describe(2, config)
    assert line == (
        "data: mix of 2 shard sets in the global order, 18 steps of 2 clips per epoch (2 rank(s) x 1); each "
        f"step's clips from one set, drawn by data.train_weights: {shards} (weight 3, 75% of the steps: 30 "
        f"samples hold a 3-frame clip, about 0.9 passes per epoch), {singles} (weight 1, 25% of the steps: "
        "6 samples hold a 1-frame clip, about 1.5 passes per epoch)"
    )


def test_a_list_of_one_source_is_that_source_and_a_mix_takes_shard_sets_only(shards, singles, tmp_path):
    from autosam2.data.sources import check_training_sources
    from autosam2.errors import DatasetError

    one = DataConfig(train=str(shards), clip_len=CLIP, batch_size=2, num_workers=0)
    listed = DataConfig(train=[str(shards)], clip_len=CLIP, batch_size=2, num_workers=0)
    clips = [
        [clip_id(b, i) for b in training_batches(d, 32, 0, 0, 1).epoch(0) for i in range(2)]
        for d in (one, listed)
    ]
    assert clips[0] == clips[1]
    folder = tmp_path / "pg"
    write_dataset(folder, SynthSpec(train_sequences=1, valid_sequences=1, frames=4, size=32))
    with pytest.raises(DatasetError, match=rf"^data.train\[1\]={folder}: not a shard set; a mix of data"):
        check_training_sources(DataConfig(train=[str(shards), str(folder)]))
    with pytest.raises(DatasetError, match=rf"^data.train\[0\]={tmp_path / 'no'}: neither a shard set"):
        check_training_sources(DataConfig(train=[str(tmp_path / "no"), str(shards)]))
    check_training_sources(DataConfig(train=[str(shards), str(singles)], clip_len=8))  # each its own length
    with pytest.raises(DatasetError, match=r"each of its shard sets holds fewer samples than one step takes"):
        training_batches(
            DataConfig(train=[str(singles), str(singles)], batch_size=4, num_workers=0), 32, 0, 0, 2
        )
