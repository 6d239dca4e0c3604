"""Flat image sets: ``SET/images/<id>`` with ``SET/masks/<id>`` of the same stem (Kvasir-SEG, the CVC sets
and ETIS in PraNet's ``TrainDataset`` / ``TestDataset/<set>`` arrangement), or CVC-ClinicDB's own
``SET/Original/<n>.tif`` with ``SET/Ground Truth/<n>.tif``.

A root that is itself a set has one split, ``all``; otherwise every set folder of the root, or of a folder
of the root, is a split named by its path (``Kvasir``, ``TestDataset/CVC-ClinicDB``). Every frame is a
one-frame sequence named by its stem, unless the set's ``sequences.csv`` groups frames: a header naming
the columns ``frame`` and ``sequence`` (others are ignored), then one row per frame, its stem or file name
and its sequence's name; a sequence's frames are in natural order of their names, and frames the CSV does
not name stay one-frame sequences (said once). Every image has a mask: one without is a problem.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from autosam2.data.layouts.files import (
    IMAGE_SUFFIXES,
    FrameFiles,
    Problem,
    SequenceFiles,
    image_files,
    natural_key,
    pair_folder,
    say_once,
    subfolders,
)

FOLDERS = (("images", "masks"), ("Original", "Ground Truth"))  # (images, masks) folder names of a set
WHOLE = "all"  # the split of a root that is itself a set
SEQUENCES_CSV = "sequences.csv"
DEFAULT_SPLITS: dict[str, str] = {}  # no purpose has a set of its own; a root with one set reads it
RELEASE = (
    "flat image sets: Kvasir-SEG (datasets.simula.no/kvasir-seg), PraNet's TrainDataset/TestDataset "
    "(DengPingFan/PraNet README), CVC-ClinicDB's Original/Ground Truth"
)


def _holds_images(folder: Path) -> bool:
    """Whether `folder` holds an image file itself (not only subfolders, as polyp_gen's images/ does)."""
    with os.scandir(folder) as entries:
        return any(
            not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file()
            for e in entries
        )


def set_folders(folder: Path) -> tuple[Path, Path] | None:
    """The (images, masks) folders of a set folder, told by its images folder; None when it has none."""
    for images, masks in FOLDERS:
        if (folder / images).is_dir():
            return folder / images, folder / masks
    return None


def is_set(folder: Path) -> bool:
    found = set_folders(folder)
    return found is not None and _holds_images(found[0])


def splits(root: Path) -> list[str]:
    """``all`` for a root that is a set; otherwise its set folders and those of its folders, by path."""
    if is_set(root):
        return [WHOLE]
    found = []
    for name in subfolders(root):
        if is_set(root / name):
            found.append(name)
        else:
            found += [f"{name}/{sub}" for sub in subfolders(root / name) if is_set(root / name / sub)]
    return found


def looks_like(root: Path) -> bool:
    return bool(splits(root))


def set_dir(root: Path, split: str) -> Path:
    """The folder of a split's set."""
    return root if split == WHOLE and set_folders(root) is not None else root / split


def scan(root: Path, split: str) -> tuple[list[SequenceFiles], list[Problem]]:
    """Index one split: images paired with masks by stem, grouped by the set's sequences.csv if any."""
    folder = set_dir(root, split)
    found = set_folders(folder) if folder.is_dir() else None
    if found is None:
        names = " or ".join(f"{images}/" for images, _ in FOLDERS)
        return [], [Problem(folder, f"split {split!r} has no images folder ({names})")]
    image_dir, mask_dir = found
    if not mask_dir.is_dir():
        return [], [
            Problem(mask_dir, f"split {split!r} has no {mask_dir.name!r} folder beside {image_dir.name}/")
        ]
    if not _holds_images(image_dir):
        return [], [Problem(image_dir, "holds no image")]
    paired, problems = pair_folder(split, image_dir, mask_dir)
    frames = list(paired.frames) if paired else []
    table = folder / SEQUENCES_CSV
    if not table.is_file():
        return [SequenceFiles(f.name, (f,)) for f in frames], problems
    groups, csv_problems = read_sequences(table, image_files(image_dir))
    sequences, group_problems = group(frames, groups, table)
    return sequences, problems + csv_problems + group_problems


def read_sequences(table: Path, images: dict[str, Path]) -> tuple[dict[str, tuple[str, int]], list[Problem]]:
    """Each frame stem the CSV names -> (its sequence, the CSV row); a problem per row that is malformed,
    names no image of the set (by stem or file name) or names a frame already named."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        return {}, [Problem(table, f"is not a UTF-8 CSV file ({err})")]
    first, header = (rows[0][0], [c.strip().lower() for c in rows[0][1]]) if rows else (1, [])
    if "frame" not in header or "sequence" not in header:
        found = ", ".join(header) or "nothing"
        return {}, [
            Problem(
                table, f"row {first}: the header must name the columns frame and sequence (found {found})"
            )
        ]
    at_frame, at_sequence = header.index("frame"), header.index("sequence")
    by_name = {path.name: stem for stem, path in images.items()}
    image_dir = next(iter(images.values())).parent
    groups: dict[str, tuple[str, int]] = {}
    problems = []
    for n, row in rows[1:]:
        if len(row) != len(header):
            problems.append(Problem(table, f"row {n}: {len(row)} fields, the header has {len(header)}"))
            continue
        frame, sequence = row[at_frame].strip(), row[at_sequence].strip()
        stem = frame if frame in images else by_name.get(frame)
        if not frame or not sequence:
            problems.append(Problem(table, f"row {n}: empty {'frame' if not frame else 'sequence'}"))
        elif stem is None:
            problems.append(
                Problem(table, f"row {n}: no frame {frame!r} in {image_dir} (a stem or file name)")
            )
        elif stem in groups:
            problems.append(
                Problem(table, f"row {n}: frame {frame!r} is listed again (first at row {groups[stem][1]})")
            )
        else:
            groups[stem] = (sequence, n)
    return groups, problems


def group(
    frames: list[FrameFiles], groups: dict[str, tuple[str, int]], table: Path
) -> tuple[list[SequenceFiles], list[Problem]]:
    """The paired frames as sequences, in natural order of their names: the CSV's groups (frames in
    natural order), every frame it does not name on its own; a group named like such a frame is a problem."""
    grouped: dict[str, list[FrameFiles]] = {}
    rows: dict[str, int] = {}
    alone = []
    for frame in frames:  # natural order, from pair_folder
        if frame.name in groups:
            sequence, row = groups[frame.name]
            grouped.setdefault(sequence, []).append(frame)
            rows.setdefault(sequence, row)
        else:
            alone.append(frame)
    if alone:
        say_once(f"{table}: {len(alone)} frames not listed, each read as a one-frame sequence")
    problems = [
        Problem(
            table, f"row {rows[f.name]}: sequence {f.name!r} has the name of a frame the CSV does not list"
        )
        for f in alone
        if f.name in grouped
    ]
    sequences = [SequenceFiles(name, tuple(fs)) for name, fs in grouped.items()]
    sequences += [SequenceFiles(f.name, (f,)) for f in alone if f.name not in grouped]
    return sorted(sequences, key=lambda s: natural_key(s.name)), problems
