"""The streaming clip pipeline: WebDataset shards -> clip batches, split over ranks and loader workers.

Training, in the global order (``data.order=global``; `autosam2.data.order`): epoch e's samples
come in one sequence fixed by (seed, e) — a seeded permutation of the shards, shuffled inside windows of
``shuffle_shards`` shards — and each global step takes the next ranks x B of them, rank r its B, from
the loader worker DataLoader's round robin asks. A clip's window of T frames and its augmentation are
drawn from (seed, epoch, position), so what a step trains on does not depend on the world size or the
worker count. A worker reads only its own samples, by their offsets in the tar. `start_at(epoch,
position, epochs)` begins an iteration anywhere (a resume: nothing before it is read) and runs through
the epochs with one loader, so its workers live across epoch boundaries.

Training from a mix of shard sets (`MixedStream`): each global step takes its clips from one set, the one
`MixOrder` draws for it, at the set's own clip length and positions in its own global order; the rest
is as above, one loader serving every set.

Training, resampled (``data.order=resample``): every (rank, worker) draws shards with replacement from its
own seeded RNG (webdataset's ``ResampledShards``), shuffles samples in a buffer, takes a random window
of T frames inside each chunk, decodes only those frames, resizes them to the model's size, draws the
clip's augmentation and batches B clips; ``with_epoch`` makes every rank yield exactly the same number
of batches. Everything random is seeded by (seed, epoch, rank, worker): a resume is exact only at the
same world size and worker count, and replays the epoch up to its position.

Evaluation: shards in manifest order, split by loader worker (``split_by_worker``); the chunks of each
sequence are joined back into the whole sequence, yielded as a one-clip batch. The shard writer keeps
each sequence inside one shard, so no sequence is split. Evaluation ranks take whole sequences by name
(`sequences(names)`): a rank reads only the shards holding its sequences and skips the others' samples
undecoded; without names, ranks split the shards (``split_by_node``).

Ranks: a stream given its rank and world size reads as that rank, whatever the environment says; without
them, as RANK / WORLD_SIZE or torch.distributed say (the reading a launcher's processes share).

Bad data: by default a truncated shard or a broken sample raises a ShardError naming the shard and the
sample key. With ``on_error="skip"`` the sample (or the unread rest of a broken shard) is skipped and
counted in ``skipped``, a counter shared with the loader workers, for logging; evaluation also warns
for each; in the global order a skipped sample's place goes to the next readable sample of the epoch's
order, so every step keeps its clips. Skipping has a bound: once every sample of the set has failed since the last good clip, the
training stream stops with a ShardError. In loader workers these errors reach the main process as
themselves (one line), and workers never outlive their process, however it ends.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import multiprocessing
import multiprocessing.util  # its exit hook is registered on import: ours must come after it
import random
import signal
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from autosam2.config import DataConfig, OnError
from autosam2.data.order import GlobalOrder, MixOrder, MixStep, Step, TarIndex, clip_seed, longest_sample
from autosam2.data.sample_format import (
    SampleRecord,
    ShardError,
    decode_frame,
    decode_sample,
    key_sequence,
    read_manifest,
    sample_metadata,
    sample_record,
)
from autosam2.data.transforms import resize_video, sample_augment
from autosam2.data.video import ClipBatch, Frame, LazyVideo, VideoDatapoint, collate_clips
from autosam2.errors import DatasetError, SequenceSkipped


def worker_seed(*parts: int) -> int:
    """A 64-bit seed from integers, stable across processes and Python runs."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])


def read_samples(
    urls: Iterator[dict[str, Any]],
    expected: dict[str, list[str]],
    on_error: OnError,
    on_skip: Callable[[list[str], str], None],
) -> Iterator[dict[str, Any]]:
    """Tar shards -> raw samples (dicts of member bytes), with the error policy for broken tars.

    `expected` lists each url's sample keys (from the manifest): a tar cut at a header boundary reads
    like a shorter, sound one, and the keys tell the two apart. Skipped samples go to
    ``on_skip(keys, message)``.
    """
    for source in urls:
        url = source["url"]
        seen = 0
        last = None
        keys = expected.get(url, [])
        try:
            with open(url, "rb") as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    seen += 1
                    last = sample["__key__"]
                    yield sample
            if seen < len(keys):
                raise tarfile.ReadError(f"it ends after {seen} of the manifest's {len(keys)} samples")
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            where = f"after sample {last}" if last else "before its first sample"
            message = f"{url}: tar is truncated or corrupt {where} ({err})"
            if on_error == "raise":
                raise ShardError(message) from err
            on_skip(keys[seen:] or [f"{url}#{seen}"], message)


class WorkerFailure:
    """A loader worker's error, carried to the main process as an item: DataLoader would re-raise it
    with the worker's traceback pasted into its message, where users want the one line."""

    def __init__(self, error: Exception):
        self.error = error


def raise_worker_failures(items: Iterable[Any]) -> Iterator[Any]:
    """Items of a loader, with a WorkerFailure raised as the error it carries."""
    for item in items:
        if isinstance(item, WorkerFailure):
            raise item.error
        yield item


class _FailureWatch:
    """`on_error=skip` must not spin: when every sample of the set has failed since the last good clip,
    skipping cannot help, and the stream stops with the first and the last error."""

    def __init__(self, shard_dir: Path, keys: set[str]):
        self.shard_dir, self.keys = shard_dir, keys
        self.failed: set[str] = set()
        self.first: str | None = None

    def failure(self, keys: list[str], message: str) -> None:
        self.failed.update(keys)
        self.first = self.first or message
        if self.failed >= self.keys:
            raise ShardError(
                f"{self.shard_dir}: all {len(self.keys)} samples failed to read since the last good clip, so "
                f"skipping them (data.on_error=skip) cannot go on; first error: {self.first}; last: {message}"
            )

    def unusable(self, key: str) -> None:
        """A sound sample too short for a clip: no error, but no clip either."""
        self.failed.add(key)

    def success(self) -> None:
        self.failed.clear()
        self.first = None


class ClipStream(torch.utils.data.IterableDataset):
    """Iterable of ClipBatch from a shard set (``mode="train"``) or of whole sequences (``mode="eval"``).

    Use with ``torch.utils.data.DataLoader(stream, batch_size=None, num_workers=K)``; call
    ``set_epoch`` before each epoch. The stream reads as rank `rank` of `world_size` when they are given,
    otherwise as RANK / WORLD_SIZE or torch.distributed say (webdataset's reading of them). `data` is the
    run config's data section (clip length, batch size, order, shuffling, epoch length, error policy,
    augmentation); `image_size` the side clips are resized to (the model's; None, for evaluation: each
    sequence keeps its own size); `seed` seeds every draw (train.seed).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        mode: Literal["train", "eval"],
        data: DataConfig,
        image_size: int | None,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < world_size):
            raise ValueError(
                f"need both rank and world_size, 0 <= rank < world_size; got {rank}, {world_size}"
            )
        self.rank, self.world_size = rank, world_size
        self.data, self.image_size, self.seed = data, image_size, seed
        if data.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {data.on_error!r}")
        self.shard_dir = Path(shard_dir)
        self.mode = mode
        self.manifest = read_manifest(self.shard_dir)
        self.urls = [str(self.shard_dir / s["name"]) for s in self.manifest["shards"]]
        self.expected = {str(self.shard_dir / s["name"]): list(s["samples"]) for s in self.manifest["shards"]}
        if mode == "train":
            self._check_clip_len()
        self.epoch = 0
        self.global_order = (
            GlobalOrder(self.manifest, data.clip_len, seed, data.shuffle_shards)
            if mode == "train" and data.order == "global"
            else None
        )
        self._start, self._epochs = Step(0, 0), 1  # global order: where the next iteration begins and ends
        self._skipped = multiprocessing.Value("q", 0)

    def _check_clip_len(self) -> None:
        """Some sample must hold a whole clip, or training would draw samples forever and yield none."""
        per_sample = self.manifest["frames_per_sample"]
        clip_len = self.data.clip_len
        if per_sample < clip_len:
            raise ShardError(
                f"{self.shard_dir}: samples hold {per_sample} frames, fewer than clip_len {clip_len}; "
                f"rebuild the shards with --frames-per-sample >= {clip_len}"
            )
        longest = longest_sample(self.manifest)
        if longest < clip_len:
            raise ShardError(
                f"{self.shard_dir}: no sequence has clip_len {clip_len} frames (the longest has {longest}); "
                f"lower data.clip_len"
            )

    @property
    def skipped(self) -> int:
        """Samples skipped for bad data so far, over all loader workers of this process."""
        return int(self._skipped.value)

    def _count_skip(self, keys: list[str]) -> None:
        with self._skipped.get_lock():
            self._skipped.value += len(keys)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`, whole."""
        self.epoch = epoch
        self._start, self._epochs = Step(epoch, 0), epoch + 1

    def start_at(self, epoch: int, position: int, epochs: int) -> None:
        """Global order: the next iteration begins at `position` of `epoch` (global samples consumed) and
        runs through epoch `epochs` - 1, one loader (and its workers) for all of them."""
        if self.global_order is None:
            raise ValueError("start_at needs data.order=global")
        self.epoch = epoch
        self._start, self._epochs = Step(epoch, position), epochs

    def steps(self, world_size: int) -> Iterator[Step]:
        """Global order: the global steps the next iteration makes, in order (every rank's batch i is
        step i's)."""
        assert self.global_order is not None
        g = self.data.batch_size * world_size
        start = self._start
        return self.global_order.steps(
            start.epoch, start.position, self._epochs, g, self.data.batches_per_epoch
        )

    def batches_per_rank(self, world_size: int) -> int:
        g = self.data.batch_size * world_size
        if self.global_order is not None:
            return self.global_order.steps_per_epoch(g, self.data.batches_per_epoch)  # 0: fewer than a step
        if self.data.batches_per_epoch is not None:
            return self.data.batches_per_epoch
        samples = self.manifest["totals"]["samples"]
        return max(1, samples // g)

    def _place(self) -> tuple[int, int, int, int]:
        """(rank, world size, loader worker, loader workers) of the process reading now."""
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world_size = self.rank, self.world_size
        return rank, world_size, worker, num_workers

    def _split_by_rank(self, urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """webdataset's ``split_by_node``, at this stream's rank."""
        rank, world_size, _, _ = self._place()
        yield from itertools.islice(urls, rank, None, world_size)

    def __iter__(self) -> Iterator[ClipBatch]:
        rank, world_size, worker, num_workers = self._place()
        if self.mode == "eval":
            items = self._eval()
        elif self.global_order is not None:
            items = self._train_global(rank, world_size, worker, num_workers)
        else:
            items = self._train(rank, world_size, worker, num_workers)
        yield from _failures_as_items(items)

    # training ---------------------------------------------------------------------------------------
    def _train(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[ClipBatch]:
        cfg = self.data
        seed = worker_seed(self.seed, self.epoch, rank, worker)
        rng = np.random.default_rng(seed)
        total = self.batches_per_rank(world_size)
        mine = total // num_workers + (1 if worker < total % num_workers else 0)
        if mine == 0:
            return  # with_epoch(0) would mean "no limit"
        watch = _FailureWatch(self.shard_dir, {k for keys in self.expected.values() for k in keys})

        def skip(keys: list[str], message: str) -> None:
            self._count_skip(keys)
            watch.failure(keys, message)

        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            lambda src: read_samples(src, self.expected, cfg.on_error, skip),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(seed)),
            lambda src: self._clips(src, rng, skip, watch),
            wds.batched(cfg.batch_size, collation_fn=collate_clips, partial=False),
        ).with_epoch(mine)
        yield from pipeline

    def _train_global(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[ClipBatch]:
        """This rank's batches of the global steps, those of loader worker `worker`: DataLoader takes
        batch i from worker i mod `num_workers`, so the rank gets step i's clips as batch i."""
        cfg = self.data
        reader = TarIndex()
        watch = self.failure_watch()
        first = rank * cfg.batch_size
        try:
            for i, step in enumerate(self.steps(world_size)):
                if i % num_workers != worker:
                    continue
                positions = range(step.position + first, step.position + first + cfg.batch_size)
                yield collate_clips([self.clip_at(step.epoch, p, reader, watch) for p in positions])
        finally:
            reader.close()

    def failure_watch(self) -> _FailureWatch:
        """Global order: the watch over the samples that hold a clip (those the order draws)."""
        assert self.global_order is not None
        usable = {
            self.expected[self.urls[s]][i] for s, idx in enumerate(self.global_order.usable) for i in idx
        }
        return _FailureWatch(self.shard_dir, usable)

    def clip_at(self, epoch: int, position: int, reader: TarIndex, watch: _FailureWatch) -> VideoDatapoint:
        """The clip at `position` of `epoch`: the sample the order puts there, its window of frames and
        augmentation drawn from (seed, epoch, position). A broken sample under on_error=skip is counted
        and replaced by the next readable one of the epoch's order (the same one whatever the world size)."""
        cfg = self.data
        order = self.global_order
        assert order is not None
        for attempt in range(order.total):
            shard, index = order.at(epoch, position, later=attempt)
            url = self.urls[shard]
            key = self.expected[url][index]
            rng = np.random.default_rng(clip_seed(self.seed, epoch, position))
            try:
                sample = reader.read(url, key)
                frames = len(sample_record(sample).frames)
                if frames < cfg.clip_len:
                    raise ShardError(
                        f"{url}: sample {key} holds {frames} frames, fewer than the manifest says"
                    )
                start = int(rng.integers(0, frames - cfg.clip_len + 1))
                video = decode_sample(sample, slice(start, start + cfg.clip_len))
            except ShardError as err:
                if cfg.on_error == "raise":
                    raise
                self._count_skip([key])
                watch.failure([key], str(err))
                continue
            watch.success()
            video = resize_video(video, self.image_size)
            video.metadata["augment"] = sample_augment(rng, cfg.augment)
            return video
        raise ShardError(f"{self.shard_dir}: no readable sample for position {position} of epoch {epoch}")

    def _skip_or_raise(self, sample: dict[str, Any], err: ShardError, skip: Callable[[list[str], str], None]):
        if self.data.on_error == "raise":
            raise err
        skip([str(sample.get("__key__"))], str(err))

    def _clips(
        self,
        samples: Iterator[dict[str, Any]],
        rng: np.random.Generator,
        skip: Callable[[list[str], str], None],
        watch: _FailureWatch,
    ) -> Iterator[VideoDatapoint]:
        """Raw chunk -> random window of T frames, decoded, resized, with its augmentation drawn."""
        cfg = self.data
        for sample in samples:
            try:
                length = len(sample_record(sample).frames)
                if length < cfg.clip_len:
                    watch.unusable(sample["__key__"])
                    continue  # the short last chunk of a sequence cannot hold a window
                start = int(rng.integers(0, length - cfg.clip_len + 1))
                video = decode_sample(sample, slice(start, start + cfg.clip_len))
            except ShardError as err:
                self._skip_or_raise(sample, err, skip)
                continue
            watch.success()
            video = resize_video(video, self.image_size)
            video.metadata["augment"] = sample_augment(rng, cfg.augment)
            yield video

    # evaluation -------------------------------------------------------------------------------------
    def _eval(self) -> Iterator[ClipBatch]:
        for video in self.sequences():
            if self.image_size:
                video = resize_video(video, self.image_size)
            yield collate_clips([video])

    def sequences(self, names: Iterable[str] | None = None) -> Iterator[VideoDatapoint]:
        """`lazy_sequences`, each read whole into memory (a sequence skipped under on_error=skip is left out)."""
        for video in self.lazy_sequences(names):
            try:
                yield video.load()
            except SequenceSkipped:
                continue

    def lazy_sequences(self, names: Iterable[str] | None = None) -> Iterator[LazyVideo]:
        """Whole sequences at their own size, in shard order, for this loader worker, each frame decoded
        only when it is reached: those `names` (read from the shards that hold them, other samples
        skipped undecoded), or without names this rank's share of the shards (every world_size-th, as
        webdataset's ``split_by_node`` splits them). A sequence must be consumed (or dropped) before the next."""
        wanted = None if names is None else set(names)
        urls = [
            url
            for url in self.urls
            if wanted is None or any(key_sequence(key) in wanted for key in self.expected[url])
        ]
        if not urls:
            return
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            *([self._split_by_rank] if wanted is None else []),
            wds.split_by_worker,
            lambda src: read_samples(src, self.expected, self.data.on_error, self._skip_warning),
            lambda src: (s for s in src if wanted is None or key_sequence(s["__key__"]) in wanted),
        )
        samples = _Peekable(iter(pipeline))
        while (sample := samples.peek()) is not None:
            try:
                record = sample_record(sample)
            except ShardError as err:
                next(samples)
                self._skip_or_raise(sample, err, self._skip_warning)
                continue
            chunks = _SequenceChunks(self, samples, record, sample.get("__url__", str(self.shard_dir)))
            yield LazyVideo(
                record.sequence,
                (record.size[0], record.size[1]),
                record.sequence_frames,
                chunks.frames,
                {**sample_metadata(sample, record), "chunk": None},
            )
            chunks.drain()  # whatever the consumer did not read

    def _skip_warning(self, keys: list[str], message: str) -> None:
        """Evaluation skips are few and change what is measured: each one is said, and counted."""
        self._count_skip(keys)
        print(
            f"warning: skipped {len(keys)} sample(s) (data.on_error=skip): {message}",
            file=sys.stderr,
            flush=True,
        )


def _failures_as_items(items: Iterator[ClipBatch]) -> Iterator[ClipBatch]:
    """`items`; in a loader worker, a data error ends them as a WorkerFailure item instead."""
    if torch.utils.data.get_worker_info() is None:
        yield from items
        return
    try:
        yield from items
    except DatasetError as err:  # ShardError included
        yield WorkerFailure(err)


class MixedStream(torch.utils.data.IterableDataset):
    """Iterable of ClipBatch from several shard sets mixed step by step (`MixOrder`), each a training
    ClipStream in the global order with its own clip length and seed; used like one (`make_loader`,
    `set_epoch`, `start_at`, `steps`). Rank r takes clips [rB, rB + B) of each step from the step's
    source, loader worker w the steps i = w mod workers, as in one shard set's global order. A clip's
    video id is `<source>:<sequence>`, so sequences of one name in two sets stay apart (the feature
    cache keys frames by it)."""

    def __init__(self, sources: list[ClipStream], order: MixOrder, seed: int):
        if any(s.global_order is None or s.rank is None for s in sources):
            raise ValueError("a mix needs training streams in the global order, given their rank")
        self.sources, self.order, self.seed = sources, order, seed
        self.rank, self.batch_size = sources[0].rank, sources[0].data.batch_size
        self._start, self._epochs = Step(0, 0), 1

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)

    def set_epoch(self, epoch: int) -> None:
        self._start, self._epochs = Step(epoch, 0), epoch + 1

    def start_at(self, epoch: int, position: int, epochs: int) -> None:
        self._start, self._epochs = Step(epoch, position), epochs

    def steps(self) -> Iterator[MixStep]:
        """The global steps the next iteration makes, in order (every rank's batch i is step i's)."""
        return self.order.steps(self._start.epoch, self._start.position, self._epochs)

    def __iter__(self) -> Iterator[ClipBatch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from _failures_as_items(self._batches(worker, num_workers))

    def _batches(self, worker: int, num_workers: int) -> Iterator[ClipBatch]:
        readers = [TarIndex() for _ in self.sources]
        watches = [s.failure_watch() for s in self.sources]
        first = self.rank * self.batch_size
        try:
            for i, step in enumerate(self.steps()):
                if i % num_workers != worker:
                    continue
                k, source = step.source, self.sources[step.source]
                positions = range(step.at + first, step.at + first + self.batch_size)
                batch = collate_clips(
                    [source.clip_at(step.epoch, p, readers[k], watches[k]) for p in positions]
                )
                batch.video_ids = [f"{k}:{name}" for name in batch.video_ids]
                yield batch
        finally:
            for reader in readers:
                reader.close()


class _Peekable:
    """An iterator whose next item can be looked at first (None at the end)."""

    _END = object()

    def __init__(self, items: Iterator[Any]):
        self.items, self.next_item = items, self._END

    def peek(self) -> Any:
        if self.next_item is self._END:
            self.next_item = next(self.items, None)
        return self.next_item

    def __next__(self) -> Any:
        item, self.next_item = self.peek(), self._END
        return item


class _SequenceChunks:
    """The consecutive chunks (samples) of one sequence in a sample stream, decoded a frame at a time.
    Chunks must arrive complete and in order; a gap or a broken frame is a ShardError naming the shard,
    or under on_error=skip a warning, the rest of the sequence dropped, and SequenceSkipped."""

    def __init__(self, stream: ClipStream, samples: _Peekable, first: SampleRecord, url: str):
        self.stream, self.samples, self.first, self.url = stream, samples, first, url
        self.keys: list[str] = []

    def _next_chunk(self) -> dict[str, Any] | None:
        sample = self.samples.peek()
        if sample is None or key_sequence(sample["__key__"]) != self.first.sequence:
            return None
        next(self.samples)
        self.keys.append(sample["__key__"])
        return sample

    def frames(self) -> Iterator[Frame]:
        try:
            chunks: list[int] = []
            while (sample := self._next_chunk()) is not None:
                record = sample_record(sample)
                chunks.append(record.chunk)
                if record.chunk != len(chunks) - 1:
                    break
                for i in range(len(record.frames)):
                    yield decode_frame(sample, record, i)
            if chunks != list(range(self.first.num_chunks)):
                raise ShardError(
                    f"{self.url}: sequence {self.first.sequence} has chunks {chunks} of {self.first.num_chunks}"
                )
        except ShardError as err:
            if self.stream.data.on_error == "raise":
                raise
            self.drain()
            self.stream._skip_warning(self.keys, str(err))
            raise SequenceSkipped(str(err)) from err

    def drain(self) -> None:
        while self._next_chunk() is not None:
            pass


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of a job step, and Ctrl-C every process of
    the terminal's foreground group; workers leave the stop decision (checkpoint at the next step) to
    their main process instead of dying under it. They die with it instead: the kernel kills a worker
    when its rank exits, however it exits (kill -9 too)."""
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the loader's own watchdog still ends orphaned workers
        pass


def _kill_loader_workers() -> None:
    """At interpreter exit, after an error too: loader workers ignore SIGTERM, so multiprocessing's exit
    hook (terminate every daemonic child, then join it) would wait on them forever. This hook is
    registered after that one, so it runs first and does the same with SIGKILL."""
    # the loader's SIGCHLD handler would raise "worker killed" in the middle of this, one worker in
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


_PR_SET_PDEATHSIG = 1
atexit.register(_kill_loader_workers)


def make_loader(
    stream: ClipStream | MixedStream, num_workers: int, pin_memory: bool = False
) -> Iterable[ClipBatch]:
    """A DataLoader over the stream (batching happens inside the stream, so batch_size=None); a worker's
    data error is raised in the main process as itself, one line, not as DataLoader's traceback text."""
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: worker seeds do not draw from (and shift) the global RNG a resume restores
        generator=torch.Generator().manual_seed(stream.seed),
        worker_init_fn=ignore_stop_signals,
    )
    return _Loader(loader)


class _Loader:
    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[ClipBatch]:
        return raise_worker_failures(self.loader)
