"""PolypGen (Ali et al., Scientific Data 10, 75 (2023); the Synapse release
``PolypGen2021_MultiCenterData_v3``), read where it lies. ROOT is the folder holding:

- ``data_C<n>/images_C<n>/<stem>.jpg`` and ``data_C<n>/masks_C<n>/<stem>_mask.jpg``: a centre's single
  frames; each frame is a one-frame sequence named by its stem (frames of one centre differ in size).
- ``sequenceData/positive/seq<k>/images_seq<k>/<stem>.jpg`` and ``.../masks_seq<k>/<stem>_mask.jpg``:
  sequences from videos with a polyp (some of their masks are empty: the polyp is out of view).
- ``sequenceData/negativeOnly/seq<k>_neg/<stem>.jpg``: sequences of normal mucosa with no mask files;
  their frames are polyp-free (``FrameFiles.mask`` is None).

A split is named by its folder: ``data_C1`` .. ``data_C6``, ``sequenceData/positive``,
``sequenceData/negativeOnly``, or one sequence folder of the last two (``sequenceData/positive/seq3``).
A missing mask is a problem everywhere but in ``negativeOnly``. The release's bbox, overlay and pooled
folders (``bbox_*``, ``imagesAll_positive``, ``dataDetails_*``) are not read. Frames and sequences are in
the natural order of their names.
"""

from __future__ import annotations

import re
from pathlib import Path

from autosam2.data.layouts.files import (
    FrameFiles,
    Problem,
    SequenceFiles,
    duplicate_stems,
    image_files,
    natural_key,
    pair_folder,
    subfolders,
)

POSITIVE = "sequenceData/positive"
NEGATIVE = "sequenceData/negativeOnly"
MASK_SUFFIX = "_mask"
# The release has no train/test split. C1..C5's single frames were EndoCV2021's training data and C6's
# were not: C6 validates, the video sequences test; training names its centres (no default).
DEFAULT_SPLITS = {"valid": "data_C6", "test": POSITIVE}
RELEASE = (
    "PolypGen2021_MultiCenterData_v3 (Synapse syn26376615; Ali et al., Sci Data 2023): data_C1..C6 "
    "single frames, sequenceData/positive and negativeOnly"
)
_CENTRE = re.compile(r"data_(C\d+)")


def centres(root: Path) -> list[str]:
    """The single-frame folders of `root`: ``data_<centre>`` holding ``images_<centre>/``."""
    names = [n for n in subfolders(root) if _CENTRE.fullmatch(n)]
    return [n for n in names if (root / n / f"images_{n.removeprefix('data_')}").is_dir()]


def splits(root: Path) -> list[str]:
    """The centres, then the positive and negative sequence sets that are present."""
    return centres(root) + [s for s in (POSITIVE, NEGATIVE) if (root / s).is_dir()]


def looks_like(root: Path) -> bool:
    return bool(splits(root))


def scan(root: Path, split: str) -> tuple[list[SequenceFiles], list[Problem]]:
    """Index one split from the file names alone (no decoding); the index and every problem."""
    split = Path(split).as_posix()
    folder = root / split
    if _CENTRE.fullmatch(split):
        return _single_frames(folder, split.removeprefix("data_"))
    if split in (POSITIVE, NEGATIVE):
        names = subfolders(folder) if folder.is_dir() else []
        if not names:
            return [], [Problem(folder, "holds no sequence folder")]
        return _sequences(folder, names, negative=split == NEGATIVE)
    parent = Path(split).parent.as_posix()
    if parent in (POSITIVE, NEGATIVE) and folder.is_dir():
        return _sequences(folder.parent, [folder.name], negative=parent == NEGATIVE)
    named = ", ".join(splits(root)) or "none"
    return [], [
        Problem(folder, f"not a PolypGen split (splits: {named}, or one sequence folder of the last two)")
    ]


def _single_frames(folder: Path, centre: str) -> tuple[list[SequenceFiles], list[Problem]]:
    """A centre's frames, each its own one-frame sequence."""
    image_dir = folder / f"images_{centre}"
    if not image_dir.is_dir():
        return [], [Problem(image_dir, f"centre {centre} has no images folder")]
    paired, problems = pair_folder(
        folder.name, image_dir, folder / f"masks_{centre}", mask_suffix=MASK_SUFFIX
    )
    frames = paired.frames if paired is not None else ()
    return [SequenceFiles(frame.name, (frame,)) for frame in frames], problems


def _sequences(folder: Path, names: list[str], negative: bool) -> tuple[list[SequenceFiles], list[Problem]]:
    """Sequences of a positive set (``<name>/images_<name>`` + ``masks_<name>``) or of negativeOnly
    (``<name>/`` holding the frames, no masks)."""
    sequences, problems = [], []
    for name in names:
        if negative:
            sequence, found = _negative(name, folder / name)
        else:
            image_dir = folder / name / f"images_{name}"
            if not image_dir.is_dir():
                problems.append(Problem(image_dir, f"sequence {name!r} has no images folder"))
                continue
            sequence, found = pair_folder(
                name, image_dir, folder / name / f"masks_{name}", mask_suffix=MASK_SUFFIX
            )
        problems += found
        if sequence is not None:
            sequences.append(sequence)
    return sequences, problems


def _negative(name: str, folder: Path) -> tuple[SequenceFiles | None, list[Problem]]:
    """A negative-only sequence: its frames without masks, polyp-free by the release's rule; a mask file
    there (``<stem>_mask``) is a problem, never read as a frame."""
    images = image_files(folder)
    problems = duplicate_stems(folder)
    for stem in [s for s in images if s.endswith(MASK_SUFFIX)]:
        problems.append(
            Problem(images.pop(stem), "a mask in a negative-only sequence, whose frames are polyp-free")
        )
    if not images:
        return None, problems + [Problem(folder, "sequence folder has no frames")]
    stems = sorted(images, key=natural_key)
    return SequenceFiles(name, tuple(FrameFiles(s, images[s], None) for s in stems)), problems
