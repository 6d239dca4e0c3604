"""Shards or folders? The one answer: which a data path is, whether it can feed a run, the training
batches a run draws from it and the whole sequences evaluation reads.

A shard set (``manifest.json``) streams through `ClipStream`; a dataset folder in any layout
(`autosam2.data.layouts`, one split of it) is read frame by frame, for quick runs without shards and as
the baseline the data benchmark compares the stream with (`FolderClips`: the same window, decode, resize
and augmentation draw, seeded by (seed, epoch, index)).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autosam2.config import AugmentConfig, DataConfig, Layout, OnError
from autosam2.data.batches import TrainingBatches
from autosam2.data.folder import FolderDataset
from autosam2.data.layouts import split_name
from autosam2.data.order import MixOrder, longest_sample, source_seed, usable_samples
from autosam2.data.sample_format import MANIFEST, read_manifest
from autosam2.data.stream import (
    ClipStream,
    MixedStream,
    WorkerFailure,
    ignore_stop_signals,
    make_loader,
    raise_worker_failures,
    worker_seed,
)
from autosam2.data.transforms import resize_video, sample_augment
from autosam2.data.video import ClipBatch, Frame, LazyVideo, VideoDatapoint, collate_clips
from autosam2.errors import DatasetError, SequenceSkipped


def is_shard_set(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_source(
    path: str | Path,
    purpose: str,
    clip_len: int | None = None,
    key: str = "data",
    layout: Layout | str = Layout.auto,
    split: str | None = None,
) -> None:
    """Raise one error naming the path if it cannot feed `purpose` (train / valid, with `clip_len`-frame
    training clips): no such folder, a broken manifest, a folder in no layout or with problems, a split it
    does not have (`split`, or the layout's own for `purpose`), no sequence long enough. Reads manifests
    and file names only."""
    if is_shard_set(path):  # the manifest is checked; no clip is drawn, so no size or seed applies
        ClipStream(path, "train" if clip_len else "eval", DataConfig(clip_len=clip_len or 1), None, seed=0)
        return
    if not Path(path).is_dir():
        raise DatasetError(f"{key}={path}: neither a shard set ({MANIFEST}) nor a dataset folder")
    split = split_name(path, layout, split, purpose)
    dataset = FolderDataset(path, split, clip_len, layout=layout)
    if clip_len and not dataset.windows:
        longest = max((dataset.num_frames(n) for n in dataset.sequence_names), default=0)
        raise DatasetError(
            f"{path}: no {split} sequence has clip_len {clip_len} frames (the longest has {longest}); "
            "lower data.clip_len"
        )


# training -----------------------------------------------------------------------------------------------


class FolderClips(torch.utils.data.Dataset):
    """Clip windows of T frames from a split of a dataset folder (None: its layout's train split), resized
    and with their augmentation drawn."""

    def __init__(
        self,
        root: str | Path,
        split: str | None,
        clip_len: int,
        image_size: int,
        seed: int,
        stride: int = 1,
        augment: AugmentConfig | None = None,
        layout: Layout | str = Layout.auto,
    ):
        split = split_name(root, layout, split, "train")
        self.dataset = FolderDataset(root, split, clip_len=clip_len, stride=stride, layout=layout)
        self.image_size = image_size
        self.seed = seed
        self.augment = augment or AugmentConfig()
        self.epoch, self.passage = 0, 0

    def set_epoch(self, epoch: int, passage: int = 0) -> None:
        """Draw for `epoch`, and its `passage`-th pass over the windows (an epoch longer than the set)."""
        self.epoch, self.passage = epoch, passage

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> VideoDatapoint | WorkerFailure:
        extra = (self.passage,) if self.passage else ()
        rng = np.random.default_rng(worker_seed(self.seed, self.epoch, index, *extra))
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


def training_batches(
    data: DataConfig, image_size: int, seed: int, rank: int, world_size: int, pin_memory: bool = False
) -> TrainingBatches:
    """The training batches of `data.train` for rank `rank` of `world_size` (those given, whatever the
    environment says): the shard stream, clips of a folder, or a mix of shard sets."""
    if len(data.train_sources()) > 1:
        return _mixed_batches(data, image_size, seed, rank, world_size, pin_memory)
    data = replace(data, train=data.train_sources()[0])
    if is_shard_set(data.train):
        return _shard_batches(data, image_size, seed, rank, world_size, pin_memory)
    return _folder_batches(data, image_size, seed, rank, world_size)


def check_training_sources(data: DataConfig) -> None:
    """Raise one error naming the first source of `data.train` that cannot feed training (`check_source`);
    a mix takes shard sets only, each at its own clip length (see `_mixed_batches`)."""
    paths = data.train_sources()
    if len(paths) == 1:
        check_source(paths[0], "train", data.clip_len, "data.train", data.layout, data.train_split)
        return
    for i, path in enumerate(paths):
        check_source(path, "train", 1, key=f"data.train[{i}]")
        if not is_shard_set(path):
            raise DatasetError(
                f"data.train[{i}]={path}: not a shard set; a mix of data.train sources reads shard sets only "
                f"(build one with `python -m shards build {path} --split train --output-dir DIR`)"
            )


def _shard_batches(
    data: DataConfig, image_size: int, seed: int, rank: int, world_size: int, pin_memory: bool
) -> TrainingBatches:
    stream = ClipStream(data.train, "train", data, image_size, seed, rank, world_size)

    def shard_epoch(epoch: int) -> Iterable[ClipBatch]:
        stream.set_epoch(epoch)
        return make_loader(stream, data.num_workers, pin_memory=pin_memory)

    per_epoch = stream.batches_per_rank(world_size)
    if per_epoch == 0:
        raise DatasetError(
            f"{data.train}: {stream.global_order.total} samples hold a {data.clip_len}-frame clip, fewer "
            f"than one step takes ({world_size} rank(s) x data.batch_size {data.batch_size}); set "
            "data.batches_per_epoch (the order then cycles through the set), or use fewer ranks"
        )
    if stream.global_order is None:
        held = sum(len(u) for u in usable_samples(stream.manifest, data.clip_len))
        source = "resampled order (shards drawn with replacement)"
        return TrainingBatches(shard_epoch, per_epoch, lambda: stream.skipped, source=source, held=held)

    def seek(epoch: int, position: int, epochs: int) -> Iterator[tuple[int, ClipBatch]]:
        stream.start_at(epoch, position, epochs)
        steps = stream.steps(world_size)  # what the workers serve, batch by batch
        loader = make_loader(stream, data.num_workers, pin_memory=pin_memory)
        for step, batch in zip(steps, loader, strict=False):
            yield step.epoch, batch

    dropped = stream.global_order.dropped(data.batch_size * world_size, data.batches_per_epoch)
    held = stream.global_order.total
    return TrainingBatches(
        shard_epoch, per_epoch, lambda: stream.skipped, seek, dropped, "global order", held
    )


def _mixed_batches(
    data: DataConfig, image_size: int, seed: int, rank: int, world_size: int, pin_memory: bool
) -> TrainingBatches:
    """Shard sets mixed step by step in the global order (`MixOrder`): an epoch of
    data.batches_per_epoch steps, or of the sets' own steps summed. A set whose samples all hold fewer
    than data.clip_len frames trains clips of as many frames as its longest sample (one-frame sequences:
    one-frame clips, frame mode); each set has its own seed (`source_seed`)."""
    paths = data.train_sources()
    weights = data.train_weights or [1.0] * len(paths)
    streams = []
    for k, path in enumerate(paths):
        longest = longest_sample(read_manifest(Path(path)))
        own = replace(data, train=path, clip_len=max(1, min(data.clip_len, longest)))
        streams.append(ClipStream(path, "train", own, image_size, source_seed(seed, k), rank, world_size))
    g = data.batch_size * world_size
    per_epoch = data.batches_per_epoch or sum(s.global_order.total // g for s in streams)
    if per_epoch == 0:
        raise DatasetError(
            f"data.train: each of its shard sets holds fewer samples than one step takes ({world_size} "
            f"rank(s) x data.batch_size {data.batch_size}); set data.batches_per_epoch (each set then "
            "cycles), or use fewer ranks"
        )
    stream = MixedStream(streams, MixOrder(weights, seed, per_epoch, g), seed)

    def mix_epoch(epoch: int) -> Iterable[ClipBatch]:
        stream.set_epoch(epoch)
        return make_loader(stream, data.num_workers, pin_memory=pin_memory)

    def seek(epoch: int, position: int, epochs: int) -> Iterator[tuple[int, ClipBatch]]:
        stream.start_at(epoch, position, epochs)
        steps = stream.steps()  # what the workers serve, batch by batch
        loader = make_loader(stream, data.num_workers, pin_memory=pin_memory)
        for step, batch in zip(steps, loader, strict=False):
            yield step.epoch, batch

    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    said = [
        f"{s.shard_dir} (weight {w:g}, {share:.0%} of the steps: {s.global_order.total} samples hold a "
        f"{s.data.clip_len}-frame clip, about {share * per_epoch * g / s.global_order.total:.2g} passes "
        "per epoch)"
        for s, w, share in zip(streams, weights, shares, strict=True)
    ]
    mix = "each step's clips from one set, drawn by data.train_weights: " + ", ".join(said)
    source = f"mix of {len(paths)} shard sets in the global order"
    return TrainingBatches(mix_epoch, per_epoch, lambda: stream.skipped, seek, source=source, mix=mix)


def _folder_batches(
    data: DataConfig, image_size: int, seed: int, rank: int, world_size: int
) -> TrainingBatches:
    """Clip windows of a dataset folder's train split, this rank's share of each pass; an epoch longer
    than the set goes on with further passes, each a fresh permutation and fresh augmentations."""
    clips = FolderClips(
        data.train,
        data.train_split,
        data.clip_len,
        image_size,
        seed=seed,
        augment=data.augment,
        layout=data.layout,
    )
    per_pass = len(clips) // world_size // data.batch_size  # what DistributedSampler(drop_last) serves
    if per_pass == 0:
        raise DatasetError(
            f"{data.train}: {len(clips)} windows of {data.clip_len} frames, fewer than one step takes "
            f"({world_size} rank(s) x data.batch_size {data.batch_size}); lower data.batch_size or "
            "data.clip_len, or use fewer ranks"
        )
    per_epoch = data.batches_per_epoch or per_pass

    def passage(epoch: int, index: int) -> Iterator[ClipBatch]:
        # pass 0 is seeded by the epoch alone: a run whose epoch fits the set draws what it always did;
        # later passes by (seed, epoch, pass), cut below 2**62 (the sampler adds the epoch to it)
        sampler = torch.utils.data.DistributedSampler(
            clips,
            world_size,
            rank,
            shuffle=True,
            seed=seed if index == 0 else worker_seed(seed, epoch, index) >> 2,
            drop_last=True,
        )
        sampler.set_epoch(epoch if index == 0 else 0)
        clips.set_epoch(epoch, index)
        loader = torch.utils.data.DataLoader(
            clips,
            batch_size=data.batch_size,
            sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=collate_or_failure,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
        )
        return raise_worker_failures(loader)

    def folder_epoch(epoch: int) -> Iterable[ClipBatch]:
        passes = (passage(epoch, i) for i in range(math.ceil(per_epoch / per_pass)))
        return itertools.islice(itertools.chain.from_iterable(passes), per_epoch)

    source = f"{clips.dataset.layout} folder"
    return TrainingBatches(folder_epoch, per_epoch, source=source, held=len(clips))


# evaluation ---------------------------------------------------------------------------------------------


def share(names: list[str], rank: int, world_size: int, limit: int | None = None) -> list[str]:
    """The sequences of `names` (the first `limit`) that rank `rank` of `world_size` evaluates."""
    return (names[:limit] if limit else names)[rank::world_size]


class Sequences:
    """This rank's sequences of a source, in order: `names` (so `len` is known before any is read), and
    iterating reads them lazily, one `LazyVideo` each."""

    def __init__(self, names: list[str], read: Callable[[], Iterator[LazyVideo]]):
        self.names, self._read = names, read

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[LazyVideo]:
        return self._read()


def read_sequences(
    source: str | Path,
    split: str | None,
    rank: int,
    world_size: int,
    limit: int | None = None,
    on_error: OnError | str = "raise",
    decode_device: torch.device | None = None,
    layout: Layout | str = Layout.auto,
) -> Sequences:
    """Whole sequences of a shard set or of one split of a dataset folder (`split`; None: its layout's
    valid split), this rank's share, read lazily (a frame is decoded when it is reached): the first
    `limit` sequences in the set's order, every `world_size`-th from the `rank`-th. With
    ``on_error="skip"`` a sequence that cannot be read to its end is said in a warning and its frames
    raise SequenceSkipped, for the consumer to forget it. ``decode_device``: where a folder's JPEG frames
    are decoded (None: here; shards decode in the stream)."""
    if is_shard_set(source):  # whole sequences at their own size: nothing is drawn, no seed applies
        stream = ClipStream(source, "eval", DataConfig(on_error=on_error), image_size=None, seed=0)
        names = share(sorted(stream.manifest["sequences"]), rank, world_size, limit)
        return Sequences(names, lambda: stream.lazy_sequences(names))
    split = split_name(source, layout, split, "valid")
    dataset = FolderDataset(source, split, decode_device=decode_device, layout=layout)
    names = share(dataset.sequence_names, rank, world_size, limit)

    def videos() -> Iterator[LazyVideo]:
        for name in names:
            try:
                video = dataset.lazy_sequence(name)
            except DatasetError as err:
                if on_error == "raise":
                    raise
                _skipped(name, err)
                continue
            yield video if on_error == "raise" else replace(video, read=_skip_policy(video))

    return Sequences(names, videos)


def _skipped(name: str, err: Exception) -> None:
    print(f"warning: skipped sequence {name} (data.on_error=skip): {err}", file=sys.stderr, flush=True)


def _skip_policy(video: LazyVideo) -> Callable[[], Iterator[Frame]]:
    """`video`'s frame reader, with a read error said once and raised as SequenceSkipped."""
    read = video.read

    def frames() -> Iterator[Frame]:
        try:
            yield from read()
        except DatasetError as err:
            _skipped(video.video_id, err)
            raise SequenceSkipped(str(err)) from err

    return frames
