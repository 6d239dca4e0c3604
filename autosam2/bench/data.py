"""Data throughput: the shard stream (a: the global order, the default; a_resampled: data.order=resample)
against the folder reader (b) and bare JPEG decoding of the same frame files (c), in frames/s, the readers
interleaved over rounds and medians reported. Then resume cost: the time to the first batch of a stream
resumed at 10 % and at 90 % of a `--resume-samples` epoch (the global order seeks; the resampled order
replays the batches before its position)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from autosam2.arguments import non_negative_int, positive_int
from autosam2.bench.common import synthetic_shards
from autosam2.config import DataConfig
from autosam2.data.codec import decode_image
from autosam2.data.sources import FolderClips
from autosam2.data.stream import ClipStream, make_loader
from autosam2.data.synthetic import SynthSpec
from autosam2.data.transforms import prepare_batch
from autosam2.data.video import collate_clips


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root", type=Path, default=None, help="a polyp_gen root to read (default: a synthetic one)"
    )
    p.add_argument("--size", type=positive_int, default=512, help="synthetic frame side (default 512)")
    p.add_argument("--image-size", type=positive_int, default=512, help="model image size (default 512)")
    p.add_argument("--sequences", type=positive_int, default=6)
    p.add_argument("--frames", type=positive_int, default=32)
    p.add_argument("--frames-per-sample", type=positive_int, default=16)
    p.add_argument("--clip-len", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=2, help="clips per batch (default 2)")
    workers = DataConfig().num_workers
    p.add_argument(
        "--loader-workers",
        "--workers",
        dest="loader_workers",
        type=non_negative_int,
        default=workers,
        help=f"DataLoader worker processes of each reader, as data.num_workers (default {workers})",
    )
    p.add_argument("--batches", type=positive_int, default=25, help="batches timed per reader and round")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument(
        "--resume-samples", type=int, default=2000, help="samples of the resume-cost epoch (0: skip it)"
    )


class _FrameFiles(torch.utils.data.Dataset):
    """Bare decoding: read and decode one frame file, nothing else."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.paths[index].read_bytes(), self.paths[index])


def _stack_frames(frames: list[torch.Tensor]) -> torch.Tensor:
    """One tensor per batch, stacked as decoded (channel-last), so c ships frames the way a and b do."""
    return torch.stack([f.permute(1, 2, 0) for f in frames])


def _frames_per_second(
    batches: Iterable, frames_in: Callable[[Any], int], limit: int, consume: Callable | None = None
) -> float:
    """Frames/s after the first batch (worker start-up and first prefetch are left out, alike for all)."""
    iterator = iter(batches)
    first = next(iterator)
    if consume:
        consume(first)
    frames, start = 0, time.perf_counter()
    for i, batch in enumerate(iterator, start=1):
        if consume:
            consume(batch)
        frames += frames_in(batch)
        if i >= limit:
            break
    return frames / (time.perf_counter() - start)


def _cycle(loader: torch.utils.data.DataLoader) -> Iterable:
    while True:
        yield from loader


NOTES = (
    "a, b: loader workers decode the clip window, resize to image_size and draw the augmentation; "
    "the augmentation itself runs batched on the training device (prepare_batch), shown on the CPU in "
    "a_shard_stream_with_cpu_augment. c: read + decode of the same frame files only. resume: a shard set "
    "of --resume-samples 2-frame samples at 64 px, 2-clip batches, the same loader workers; seconds from "
    "asking for the stream at the position to its first batch (medians of --rounds)."
)


def _readers(args: argparse.Namespace, root: Path, shard_dir: Path) -> dict[str, Callable[[int], float]]:
    """Each reader as a function of the round (the shard stream's seed) to its frames/s."""
    t, b, w = args.clip_len, args.batch_size, args.loader_workers
    per_batch = t * b

    def shard_stream(seed: int, order: str = "global") -> ClipStream:
        data = DataConfig(clip_len=t, batch_size=b, batches_per_epoch=args.batches + 1, order=order)
        return ClipStream(shard_dir, "train", data, args.image_size, seed)

    clips = FolderClips(
        root, "train", clip_len=t, image_size=args.image_size, seed=0, stride=args.frames_per_sample
    )
    frame_paths = [f.image for s in clips.dataset.sequences.values() for f in s.frames]
    loader = dict(num_workers=w, drop_last=True, shuffle=True, prefetch_factor=4 if w else None)
    return {
        "a": lambda r: _frames_per_second(make_loader(shard_stream(r), w), lambda _: per_batch, args.batches),
        "b": lambda r: _frames_per_second(
            _cycle(torch.utils.data.DataLoader(clips, batch_size=b, collate_fn=collate_clips, **loader)),
            lambda _: per_batch,
            args.batches,
        ),
        "c": lambda r: _frames_per_second(
            _cycle(
                torch.utils.data.DataLoader(
                    _FrameFiles(frame_paths), batch_size=per_batch, collate_fn=_stack_frames, **loader
                )
            ),
            len,
            args.batches,
        ),
        "a_resampled": lambda r: _frames_per_second(
            make_loader(shard_stream(r, "resample"), w), lambda _: per_batch, args.batches
        ),
        "a_aug": lambda r: _frames_per_second(
            make_loader(shard_stream(r), w), lambda _: per_batch, args.batches, consume=prepare_batch
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        spec = SynthSpec(
            train_sequences=args.sequences, valid_sequences=1, frames=args.frames, size=args.size, seed=0
        )
        root, shard_dir = synthetic_shards(
            Path(tmp), spec, args.frames_per_sample, args.loader_workers, root=args.root
        )
        readers = _readers(args, root, shard_dir)
        # rounds interleave the readers, and medians damp the noise of a shared 2-core machine
        runs: dict[str, list[float]] = {k: [] for k in readers}
        for r in range(args.rounds):
            for name, reader in readers.items():
                runs[name].append(reader(r))
        resume = _resume_cost(Path(tmp) / "resume", args) if args.resume_samples else None
    return _figures(args, runs, resume)


def _figures(args: argparse.Namespace, runs: dict[str, list[float]], resume: dict | None) -> dict[str, Any]:
    """The report: each reader's median frames/s, their ratios against the targets, the resume cost."""
    shards, folder, decode, shards_aug, resampled = (
        statistics.median(runs[k]) for k in ("a", "b", "c", "a_aug", "a_resampled")
    )
    return {
        "bench": "data",
        "runs_frames_per_s": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
        "frames_per_s": {
            "a_shard_stream": round(shards, 1),
            "a_resampled_stream": round(resampled, 1),
            "b_folder_reader": round(folder, 1),
            "c_jpeg_decode": round(decode, 1),
            "a_shard_stream_with_cpu_augment": round(shards_aug, 1),
        },
        "ratios": {
            "a_over_c": round(shards / decode, 3),
            "a_resampled_over_c": round(resampled / decode, 3),
            "a_over_b": round(shards / folder, 3),
            "a_with_cpu_augment_over_c": round(shards_aug / decode, 3),
        },
        "resume": resume,
        "target": {
            "a_over_c": 0.9,
            "met": shards / decode >= 0.9,
            "resume_90_over_10": 1.5,
            "resume_met": None if resume is None else resume["global_order"]["ratio_90_over_10"] <= 1.5,
        },
        "config": {
            "frame_size": args.size if not args.root else "from --root",
            "image_size": args.image_size,
            "clip_len": args.clip_len,
            "batch_size": args.batch_size,
            "workers": args.loader_workers,
            "batches_timed": args.batches,
            "rounds": args.rounds,
            "frames_per_sample": args.frames_per_sample,
            "cpu_count": os.cpu_count(),
            "torch_threads_main": torch.get_num_threads(),
        },
        "notes": NOTES,
    }


def _resume_cost(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to the first batch of a stream resumed at 10 % and 90 % of an epoch, both orders."""
    sequences = max(1, args.resume_samples // 10)
    spec = SynthSpec(train_sequences=sequences, valid_sequences=1, frames=20, size=64, seed=1)
    _, shard_dir = synthetic_shards(tmp, spec, frames_per_sample=2, workers=args.loader_workers)
    batch = 2
    figures: dict[str, Any] = {}
    for order in ("global", "resample"):
        stream = ClipStream(
            shard_dir, "train", DataConfig(clip_len=2, batch_size=batch, order=order), 64, seed=0
        )
        samples = stream.batches_per_rank(1) * batch
        times: dict[str, list[float]] = {"10": [], "90": []}
        for _ in range(args.rounds):
            for share in ("10", "90"):
                position = samples * int(share) // 100 // batch * batch
                start = time.perf_counter()
                if order == "global":
                    stream.start_at(0, position, 1)
                    next(iter(make_loader(stream, args.loader_workers)))
                else:  # what a resume of the resampled order does: replay the epoch up to the position
                    stream.set_epoch(0)
                    batches = iter(make_loader(stream, args.loader_workers))
                    for _ in range(position // batch + 1):
                        next(batches)
                times[share].append(time.perf_counter() - start)
        at_10, at_90 = statistics.median(times["10"]), statistics.median(times["90"])
        figures[f"{order}_order"] = {
            "epoch_samples": samples,
            # 5 decimals: a first batch takes ~10 ms on a small set, so 3 would move the ratio by 10%
            "first_batch_s_at_10pct": round(at_10, 5),
            "first_batch_s_at_90pct": round(at_90, 5),
            "ratio_90_over_10": round(at_90 / at_10, 2),
        }
    return figures
