"""A dataset folder in any layout (`autosam2.data.layouts`): validate it and lazily read its sequences and
clip windows.

Masks are foreground above ``MASK_THRESHOLD`` because JPEG masks carry compression noise between 0 and
255: a mask with no value above it is empty (counted when it holds noise), unless it is a 0/1 label map,
which is a problem. A frame without a mask file (where its layout says such a frame is polyp-free) is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from autosam2.config import Layout
from autosam2.data.codec import (
    MASK_THRESHOLD,
    check_image,
    decode_image,
    decode_mask,
    image_size,
    read_mask,
)
from autosam2.data.layouts import FrameFiles, Problem, clean_split, reader, scan
from autosam2.data.video import POLYP_ID, Frame, LazyVideo, Object, VideoDatapoint
from autosam2.errors import DatasetError


class ClipWindow(NamedTuple):
    sequence: str
    start: int
    length: int


@dataclass
class MaskNoise:
    """Masks that read as empty though not all zero (compression noise at or below MASK_THRESHOLD), and
    the highest value seen in them."""

    masks: int = 0
    peak: int = 0

    def add(self, noise: int) -> None:
        """Count one mask by its `FrameCheck.noise` (0: not a noisy empty mask)."""
        if noise:
            self.masks += 1
            self.peak = max(self.peak, noise)

    def merge(self, other: MaskNoise) -> None:
        self.masks += other.masks
        self.peak = max(self.peak, other.peak)

    def __str__(self) -> str:
        return f"{self.masks} masks are empty with compression noise (max {self.peak})"


@dataclass
class SplitReport:
    """What `validate` found in one split."""

    split: str
    sequences: int = 0
    frames: int = 0
    empty_frames: int = 0
    soft_masks: int = 0
    noise: MaskNoise = field(default_factory=MaskNoise)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class FrameCheck:
    """One frame as every reader will see it: its problems, its size, its binarised mask and bytes."""

    problems: list[Problem]
    size: tuple[int, int] | None = None  # (H, W) of the image
    empty: bool = False  # the mask was read and holds no polyp
    soft: bool = False  # grey values between 0 and 255 (JPEG noise)
    noise: int = 0  # an empty mask's highest value (compression noise); 0 when all zero or not empty
    image_bytes: bytes = b""  # with keep_data only
    mask_HW: np.ndarray | None = None  # bool; with keep_data only


def check_frame(frame: FrameFiles, keep_data: bool = False) -> FrameCheck:
    """Read one frame and its mask the way training and the shard writer do, and list every problem:
    undecodable files, a mask whose size is not its frame's, a 0/1 label map (it would read as empty).
    A mask with no value above MASK_THRESHOLD is otherwise empty, its highest value kept as `noise`.
    `validate` and `shards build` share this, so build never writes what validate rejects."""
    check = FrameCheck([])
    try:
        check.image_bytes = frame.image.read_bytes()
        check.size = check_image(check.image_bytes, frame.image)
    except (DatasetError, OSError) as err:
        check.problems.append(Problem(frame.image, _reason(err)))
    if frame.mask is None:  # polyp-free by its layout's rule
        check.empty = True
        if keep_data and check.size is not None:
            check.mask_HW = np.zeros(check.size, dtype=bool)
        elif not keep_data:
            check.image_bytes = b""
        return check
    try:
        values, label_map = read_mask(frame.mask.read_bytes(), frame.mask)
    except (DatasetError, OSError) as err:
        check.problems.append(Problem(frame.mask, _reason(err)))
        return check
    if check.size is not None and values.shape != check.size:
        check.problems.append(
            Problem(
                frame.mask,
                f"mask is {values.shape[1]}x{values.shape[0]}, its frame is {check.size[1]}x{check.size[0]} (WxH)",
            )
        )
    if label_map:
        check.problems.append(
            Problem(
                frame.mask,
                f"mask is a 0/1 label map ({label_map}), which reads as empty: masks must be greyscale "
                f"0/255, polyp above {MASK_THRESHOLD}",
            )
        )
    mask_HW = values > MASK_THRESHOLD
    check.empty = not mask_HW.any()
    check.noise = int(values.max()) if check.empty and not label_map else 0
    check.soft = bool(((values > 0) & (values < 255)).any())
    if keep_data:
        check.mask_HW = mask_HW
    else:
        check.image_bytes = b""
    return check


def _reason(err: Exception) -> str:
    """The message of a DatasetError without its leading path (the Problem names the file)."""
    text = str(err)
    return text.split(": ", 1)[1] if isinstance(err, DatasetError) and ": " in text else text


def size_problem(
    frame: FrameFiles, size: tuple[int, int], first: tuple[int, int], first_name: str
) -> Problem:
    """A frame whose size differs from its sequence's first frame."""
    return Problem(
        frame.image,
        f"frame is {size[1]}x{size[0]}, the sequence started at {first[1]}x{first[0]} ({first_name})",
    )


def validate_split(
    root: str | Path,
    split: str,
    progress: bool = False,
    workers: int = 4,
    layout: Layout | str = Layout.auto,
) -> SplitReport:
    """Check one split completely: structure, then every image and mask decoded and sized."""
    sequences, problems = scan(root, split, layout)
    report = SplitReport(split=split, sequences=len(sequences), problems=problems)
    frames = [(seq, frame) for seq in sequences for frame in seq.frames]
    report.frames = len(frames)
    sequence_size: dict[str, tuple[tuple[int, int], str]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable = pool.map(lambda sf: check_frame(sf[1]), frames)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(frames), desc=f"validate {split}", unit="frame", leave=False)
        for (seq, frame), check in zip(frames, results, strict=True):
            report.problems += check.problems
            report.empty_frames += check.empty
            report.soft_masks += check.soft
            report.noise.add(check.noise)
            if check.size is None:
                continue
            first = sequence_size.setdefault(seq.name, (check.size, frame.image.name))
            if first[0] != check.size:
                report.problems.append(size_problem(frame, check.size, *first))
    return report


def validate_root(
    root: str | Path,
    splits: Iterable[str] | None = None,
    progress: bool = False,
    layout: Layout | str = Layout.auto,
) -> list[SplitReport]:
    """Validate each split of a dataset folder (None: every split its layout finds); a root that is no
    dataset folder, a missing split folder or a folder with no split is itself a problem."""
    root = Path(root)
    try:
        found = reader(root, layout)
    except DatasetError as err:
        return [SplitReport(split="-", problems=[Problem(root, _reason(err))])]
    present = found.splits(root)  # a split need not be a folder: `all`, a root that is one image set
    names = list(splits) if splits is not None else present
    if not names:
        return [SplitReport(split="-", problems=[Problem(root, f"holds no {found.layout} split folder")])]
    reports = []
    for split in names:
        try:
            split = clean_split(root, split)
        except DatasetError as err:
            reports.append(SplitReport(split=split, problems=[Problem(root, _reason(err))]))
            continue
        if split not in present and not (root / split).is_dir():
            there = ", ".join(present) or "none"
            problem = Problem(root / split, f"split folder is missing (splits: {there})")
            reports.append(SplitReport(split=split, problems=[problem]))
        else:
            reports.append(validate_split(root, split, progress=progress, layout=found.layout))
    return reports


class FolderDataset(torch.utils.data.Dataset):
    """Lazy reader of one split of a dataset folder in any layout; items are clip windows ``(sequence, start, T)``.

    ``clip_len=None`` makes each whole sequence one item; otherwise every window of ``clip_len``
    consecutive frames whose start is a multiple of ``stride`` (sequences shorter than ``clip_len`` are
    left out and listed in ``short_sequences``). Structural problems raise one DatasetError at
    construction; a frame whose size differs from its sequence raises when it is read.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        clip_len: int | None = None,
        stride: int = 1,
        decode_device: torch.device | None = None,
        layout: Layout | str = Layout.auto,
    ):
        self.root = Path(root)
        self.decode_device = decode_device  # None: frames decoded here (PIL); a GPU: nvJPEG there
        self.split = split
        self.layout = reader(self.root, layout).layout  # a root that is no dataset folder: one line
        sequences, problems = scan(self.root, split, self.layout)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DatasetError(
                f"{problems[0]}{more}; run `autosam2 validate {self.root} --layout {self.layout} --split {split}` to list them all"
            )
        if (clip_len is not None and clip_len < 1) or stride < 1:
            raise ValueError(f"clip_len and stride must be >= 1, got {clip_len} and {stride}")
        self.sequences = {seq.name: seq for seq in sequences}
        self.clip_len = clip_len
        self.short_sequences = [n for n, s in self.sequences.items() if clip_len and len(s.frames) < clip_len]
        self.windows = list(self._make_windows(clip_len, stride))
        self._sizes: dict[str, tuple[int, int]] = {}

    def _make_windows(self, clip_len: int | None, stride: int) -> Iterator[ClipWindow]:
        for name, seq in self.sequences.items():
            n = len(seq.frames)
            if clip_len is None:
                yield ClipWindow(name, 0, n)
            else:
                for start in range(0, n - clip_len + 1, stride):
                    yield ClipWindow(name, start, clip_len)

    @property
    def sequence_names(self) -> list[str]:
        return list(self.sequences)

    def num_frames(self, sequence: str) -> int:
        return len(self.sequences[sequence].frames)

    def sequence_size(self, sequence: str) -> tuple[int, int]:
        """(H, W) of a sequence, from the header of its first frame."""
        if sequence not in self._sizes:
            self._sizes[sequence] = image_size(self.sequences[sequence].frames[0].image)
        return self._sizes[sequence]

    def load_frame(self, sequence: str, index: int) -> Frame:
        files = self.sequences[sequence].frames[index]
        image = decode_image(files.image.read_bytes(), files.image, self.decode_device)
        if files.mask is None:  # polyp-free by its layout's rule
            mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
        else:
            mask = decode_mask(files.mask.read_bytes(), files.mask)
        expected = self.sequence_size(sequence)
        if tuple(image.shape[-2:]) != expected:
            raise DatasetError(
                f"{files.image}: frame is {image.shape[2]}x{image.shape[1]}, sequence {sequence!r} is {expected[1]}x{expected[0]} (WxH)"
            )
        if mask.shape != image.shape[-2:]:
            raise DatasetError(
                f"{files.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, its frame is {image.shape[2]}x{image.shape[1]} (WxH)"
            )
        return Frame(index, image, [Object(POLYP_ID, index, mask)], name=files.name)

    def load_clip(self, window: ClipWindow) -> VideoDatapoint:
        sequence, start, length = window
        if start < 0 or start + length > self.num_frames(sequence):
            raise IndexError(
                f"{window} is outside sequence {sequence!r} of {self.num_frames(sequence)} frames"
            )
        frames = [self.load_frame(sequence, i) for i in range(start, start + length)]
        return VideoDatapoint(
            video_id=sequence,
            frames=frames,
            size=self.sequence_size(sequence),
            metadata={"split": self.split, "start": start, "root": str(self.root)},
        )

    def load_sequence(self, sequence: str) -> VideoDatapoint:
        return self.load_clip(ClipWindow(sequence, 0, self.num_frames(sequence)))

    def lazy_sequence(self, sequence: str) -> LazyVideo:
        """A whole sequence whose frames are read one by one as they are reached."""
        n = self.num_frames(sequence)
        return LazyVideo(
            sequence,
            self.sequence_size(sequence),
            n,
            lambda: (self.load_frame(sequence, i) for i in range(n)),
            {"split": self.split, "start": 0, "root": str(self.root)},
        )

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> VideoDatapoint:
        return self.load_clip(self.windows[index])
