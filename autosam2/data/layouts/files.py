"""What a layout reader returns: a split's sequences as files (nothing decoded), and the problems found.

A frame's `mask` is None only where its layout says a frame without a mask file is polyp-free (PolypGen's
negative-only sequences); every other reader lists a missing mask as a problem.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class FrameFiles:
    name: str
    image: Path
    mask: Path | None  # None: polyp-free by the layout's rule (no mask file)
    labels: dict[str, str] = field(default_factory=dict, compare=False)  # per-frame labels (pathology)


@dataclass(frozen=True)
class SequenceFiles:
    name: str
    frames: tuple[FrameFiles, ...]


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders embedded numbers by value: frame2 < frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _images(folder: Path) -> list[Path]:
    """The image files of a folder in order of their names; hidden files and other suffixes are left
    out. One directory listing, sorted as strings: at 10,000 files a folder, stat calls and Path
    comparisons would cost more than the listing."""
    with os.scandir(folder) as entries:
        names = sorted(
            e.name
            for e in entries
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            and e.is_file()
        )
    return [folder / name for name in names]


def image_files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem; hidden files and other suffixes are ignored."""
    files: dict[str, Path] = {}
    for path in _images(folder):
        files.setdefault(path.stem, path)
    return files


def duplicate_stems(folder: Path) -> list[Problem]:
    """Two image files of one folder with the same stem (frame1.jpg and frame1.png)."""
    seen: dict[str, Path] = {}
    problems = []
    for path in _images(folder):
        if path.stem in seen:
            problems.append(Problem(path, f"same frame name as {seen[path.stem].name}; which one is meant?"))
        else:
            seen[path.stem] = path
    return problems


def subfolders(folder: Path) -> list[str]:
    """Names of the visible subfolders of `folder`, in natural order."""
    names = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=natural_key)


def pair_folder(
    name: str, image_dir: Path, mask_dir: Path, order=natural_key, mask_suffix: str = ""
) -> tuple[SequenceFiles | None, list[Problem]]:
    """One sequence from an images folder and a masks folder whose files share a stem (a mask's stem may
    end in `mask_suffix`, e.g. ``_mask``, whose '_' an image stem ending in '_' shares): every image
    without a mask and mask without an image is a problem; the paired frames in `order` of their stems."""
    images = image_files(image_dir)
    problems = duplicate_stems(image_dir)
    if not images:
        return None, problems + [Problem(image_dir, "sequence folder has no frames")]
    if not mask_dir.is_dir():
        return None, problems + [Problem(mask_dir, f"masks folder of sequence {name!r} is missing")]
    masks = {
        stem.removesuffix(mask_suffix) if mask_suffix else stem: path
        for stem, path in image_files(mask_dir).items()
    }
    problems += duplicate_stems(mask_dir)
    for stem in [s for s in images if s.endswith("_") and mask_suffix.startswith("_") and s not in masks]:
        if stem[:-1] in masks and stem[:-1] not in images:  # x_.jpg's mask written x_mask.jpg, one '_'
            masks[stem] = masks.pop(stem[:-1])
    for stem in sorted(set(images) - set(masks), key=natural_key):
        problems.append(
            Problem(images[stem], f"image has no mask (expected {mask_dir / stem}{mask_suffix}.jpg or .png)")
        )
    for stem in sorted(set(masks) - set(images), key=natural_key):
        problems.append(Problem(masks[stem], f"mask has no image (expected {image_dir / stem}.jpg)"))
    paired = sorted(set(images) & set(masks), key=order)
    if not paired:
        return None, problems
    return SequenceFiles(name, tuple(FrameFiles(s, images[s], masks[s]) for s in paired)), problems


_said: set[str] = set()


def say_once(text: str) -> None:
    """A note on stderr, once per process for the same text."""
    if text not in _said:
        _said.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)
