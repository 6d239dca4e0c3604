"""The streaming clip pipeline: WebDataset shards -> clip batches, split over ranks and loader workers.

Training: every (rank, worker) draws shards with replacement from its own seeded RNG (webdataset's
``ResampledShards``), shuffles samples in a buffer, takes a random window of T frames inside each chunk,
decodes only those frames, resizes them to the model's size, draws the clip's augmentation and batches
B clips; ``with_epoch`` makes every rank yield exactly the same number of batches, so DDP ranks never
wait on each other at the end of an epoch. Everything random is seeded by (seed, epoch, rank, worker).

Evaluation: shards in manifest order, split by rank (``split_by_node``) then by worker
(``split_by_worker``); the chunks of each sequence are joined back into the whole sequence, yielded as a
one-clip batch. The shard writer keeps each sequence inside one shard, so no sequence is split.

Bad data: by default a truncated shard or a broken sample raises a ShardError naming the shard and the
sample key. With ``on_error="skip"`` the sample (or the unread rest of a broken shard) is skipped and
counted in ``skipped``, a counter shared with the loader workers, for logging.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from autosam2.data.sample_format import ShardError, decode_sample, read_manifest, sample_record
from autosam2.data.transforms import AugmentConfig, resize_video, sample_augment
from autosam2.data.video import ClipBatch, VideoDatapoint, collate_clips

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class StreamConfig:
    """What the stream reads and how; `batches_per_epoch` is per rank (default: samples / (B x ranks))."""

    clip_len: int = 8
    batch_size: int = 1
    image_size: int | None = 256  # None (evaluation only): sequences keep their own size
    seed: int = 0
    shuffle_buffer: int = 64
    batches_per_epoch: int | None = None
    on_error: OnError = "raise"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def worker_seed(*parts: int) -> int:
    """A 64-bit seed from integers, stable across processes and Python runs."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])


def read_samples(
    urls: Iterator[dict[str, Any]],
    expected: dict[str, int],
    on_error: OnError,
    count_skip: Callable[[int], None],
) -> Iterator[dict[str, Any]]:
    """Tar shards -> raw samples (dicts of member bytes), with the error policy for broken tars.

    A tar cut at a header boundary reads like a shorter, sound one; the manifest's sample count
    (`expected`, by url) tells the two apart.
    """
    for source in urls:
        url = source["url"]
        seen = 0
        last = None
        try:
            with open(url, "rb") as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    seen += 1
                    last = sample["__key__"]
                    yield sample
            if seen < expected.get(url, 0):
                raise tarfile.ReadError(f"it ends after {seen} of the manifest's {expected[url]} samples")
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            where = f"after sample {last}" if last else "before its first sample"
            if on_error == "raise":
                raise ShardError(f"{url}: tar is truncated or corrupt {where} ({err})") from err
            count_skip(max(1, expected.get(url, seen + 1) - seen))


class ClipStream(torch.utils.data.IterableDataset):
    """Iterable of ClipBatch from a shard set (``mode="train"``) or of whole sequences (``mode="eval"``).

    Use with ``torch.utils.data.DataLoader(stream, batch_size=None, num_workers=K)``; call
    ``set_epoch`` before each epoch. Rank and world size come from RANK / WORLD_SIZE or torch.distributed,
    as webdataset reads them.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        mode: Literal["train", "eval"] = "train",
        config: StreamConfig | None = None,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.config = config or StreamConfig()
        if self.config.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.config.on_error!r}")
        self.shard_dir = Path(shard_dir)
        self.mode = mode
        self.manifest = read_manifest(self.shard_dir)
        self.urls = [str(self.shard_dir / s["name"]) for s in self.manifest["shards"]]
        self.expected = {str(self.shard_dir / s["name"]): len(s["samples"]) for s in self.manifest["shards"]}
        if mode == "train" and self.manifest["frames_per_sample"] < self.config.clip_len:
            raise ShardError(
                f"{self.shard_dir}: samples hold {self.manifest['frames_per_sample']} frames, fewer than clip_len "
                f"{self.config.clip_len}; rebuild the shards with --frames-per-sample >= {self.config.clip_len}"
            )
        self.epoch = 0
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        """Samples skipped for bad data so far, over all loader workers of this process."""
        return int(self._skipped.value)

    def _count_skip(self, n: int) -> None:
        with self._skipped.get_lock():
            self._skipped.value += n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches_per_rank(self, world_size: int) -> int:
        if self.config.batches_per_epoch is not None:
            return self.config.batches_per_epoch
        samples = self.manifest["totals"]["samples"]
        return max(1, samples // (self.config.batch_size * world_size))

    def __iter__(self) -> Iterator[ClipBatch]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.mode == "train":
            yield from self._train(rank, world_size, worker, num_workers)
        else:
            yield from self._eval()

    # training ---------------------------------------------------------------------------------------
    def _train(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[ClipBatch]:
        cfg = self.config
        seed = worker_seed(cfg.seed, self.epoch, rank, worker)
        rng = np.random.default_rng(seed)
        total = self.batches_per_rank(world_size)
        mine = total // num_workers + (1 if worker < total % num_workers else 0)
        if mine == 0:
            return  # with_epoch(0) would mean "no limit"
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            lambda src: read_samples(src, self.expected, cfg.on_error, self._count_skip),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(seed)),
            lambda src: self._clips(src, rng),
            wds.batched(cfg.batch_size, collation_fn=collate_clips, partial=False),
        ).with_epoch(mine)
        yield from pipeline

    def _skip_or_raise(self, err: ShardError) -> None:
        if self.config.on_error == "raise":
            raise err
        self._count_skip(1)

    def _clips(self, samples: Iterator[dict[str, Any]], rng: np.random.Generator) -> Iterator[VideoDatapoint]:
        """Raw chunk -> random window of T frames, decoded, resized, with its augmentation drawn."""
        cfg = self.config
        for sample in samples:
            try:
                length = len(sample_record(sample).frames)
                if length < cfg.clip_len:
                    continue  # the short last chunk of a sequence cannot hold a window
                start = int(rng.integers(0, length - cfg.clip_len + 1))
                video = decode_sample(sample, slice(start, start + cfg.clip_len))
            except ShardError as err:
                self._skip_or_raise(err)
                continue
            video = resize_video(video, cfg.image_size)
            video.metadata["augment"] = sample_augment(rng, cfg.augment)
            yield video

    # evaluation -------------------------------------------------------------------------------------
    def _eval(self) -> Iterator[ClipBatch]:
        for video in self.sequences():
            if self.config.image_size:
                video = resize_video(video, self.config.image_size)
            yield collate_clips([video])

    def sequences(self) -> Iterator[VideoDatapoint]:
        """Whole sequences at their own size, in shard order, for this rank and loader worker."""
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_node,
            wds.split_by_worker,
            lambda src: read_samples(src, self.expected, self.config.on_error, self._count_skip),
            self._sequences,
        )
        yield from pipeline

    def _sequences(self, samples: Iterator[dict[str, Any]]) -> Iterator[VideoDatapoint]:
        """Join consecutive chunks back into whole sequences; an incomplete sequence is an error."""
        parts: list[VideoDatapoint] = []

        def finish() -> Iterator[VideoDatapoint]:
            if not parts:
                return
            first = parts[0]
            chunks = [p.metadata["chunk"] for p in parts]
            if chunks != list(range(first.metadata["num_chunks"])):
                message = f"{first.metadata['url']}: sequence {first.video_id} has chunks {chunks} of {first.metadata['num_chunks']}"
                if self.config.on_error == "raise":
                    raise ShardError(message)
                self._count_skip(len(chunks))  # the chunks that did arrive are dropped with their sequence
                return
            frames = [f for p in parts for f in p.frames]
            yield VideoDatapoint(first.video_id, frames, first.size, {**first.metadata, "chunk": None})

        for sample in samples:
            try:
                video = decode_sample(sample)
            except ShardError as err:
                self._skip_or_raise(err)
                continue
            if parts and video.video_id != parts[0].video_id:
                yield from finish()
                parts = []
            parts.append(video)
        yield from finish()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of a job step; workers leave the stop
    decision (checkpoint at the next step) to their main process instead of dying under it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def make_loader(
    stream: ClipStream, num_workers: int = 2, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over the stream: batching happens inside the stream, so batch_size=None."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: worker seeds do not draw from (and shift) the global RNG a resume restores
        generator=torch.Generator().manual_seed(stream.config.seed),
        worker_init_fn=ignore_stop_signals,
    )
