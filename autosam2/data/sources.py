"""Shards or folders? The one answer: which a data path is, whether it can feed a run, and its sequences."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from autosam2.data.polyp_gen import DatasetError, PolypGenDataset
from autosam2.data.sample_format import MANIFEST
from autosam2.data.video import VideoDatapoint


def is_shard_set(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_source(path: str | Path, split: str, clip_len: int | None = None, key: str = "data") -> None:
    """Raise one error naming the path if it cannot feed `split` (with `clip_len`-frame training clips):
    no such folder, a broken manifest, a folder layout with problems, no sequence long enough. Reads
    manifests and file names only."""
    from autosam2.data.stream import ClipStream, StreamConfig

    if is_shard_set(path):
        ClipStream(path, "train" if clip_len else "eval", StreamConfig(clip_len=clip_len or 1))
        return
    if not Path(path).is_dir():
        raise DatasetError(f"{key}={path}: neither a shard set ({MANIFEST}) nor a polyp_gen root")
    dataset = PolypGenDataset(path, split, clip_len)
    if clip_len and not dataset.windows:
        longest = max((dataset.num_frames(n) for n in dataset.sequence_names), default=0)
        raise DatasetError(
            f"{path}: no {split} sequence has clip_len {clip_len} frames (the longest has {longest}); "
            "lower data.clip_len"
        )


def read_sequences(
    source: str | Path,
    split: str,
    rank: int,
    world_size: int,
    limit: int | None = None,
    on_error: str = "raise",
) -> Iterator[VideoDatapoint]:
    """Whole sequences of a shard set (split by rank through the stream) or of a polyp_gen root. With
    ``on_error="skip"`` a sequence that cannot be read is left out with a warning."""
    from autosam2.data.stream import ClipStream, StreamConfig

    if is_shard_set(source):
        stream = ClipStream(source, "eval", StreamConfig(image_size=None, on_error=on_error))
        names = sorted(stream.manifest["sequences"])[:limit] if limit else None
        for video in stream.sequences():
            if names is None or video.video_id in names:
                yield video
        return
    dataset = PolypGenDataset(source, split)
    names = dataset.sequence_names[:limit] if limit else dataset.sequence_names
    for name in names[rank::world_size]:
        try:
            video = dataset.load_sequence(name)
        except DatasetError as err:
            if on_error == "raise":
                raise
            print(
                f"warning: skipped sequence {name} (data.on_error=skip): {err}", file=sys.stderr, flush=True
            )
            continue
        yield video
