"""SUN-SEG as its annotation release v2 lies after the re-organisation step (GewelsJI/VPS,
docs/DATA_PREPARATION.md and docs/DATA_DESCRIPTION.md): ``SUN-SEG/TrainDataset/{Frame,GT,Edge,Scribble,
Polygon}/<case>/``, ``Classification/classification.txt``, ``Detection/bbox_annotation.json``; the test
splits ``TestEasyDataset/{Seen,Unseen}`` and ``TestHardDataset/{Seen,Unseen}`` with the same folders.
Frames ``.jpg``, masks ``.png`` of the same stem, named
``case_M_<date>_<id>_1_<clip>_<part>-1_a<n>_ayy_image<k>``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.layout_fixtures import frame_and_mask, save

SPLIT_CASES = {
    "TrainDataset": ["case1_1", "case1_3"],
    "TestEasyDataset/Seen": ["case2_3"],
    "TestEasyDataset/Unseen": ["case3_1"],
    "TestHardDataset/Seen": ["case1_2"],
    "TestHardDataset/Unseen": ["case10_1"],
}
CLASSES = ("low_grade_adenoma", "hyperplastic_polyp", "sessile_serrated_lesion")


def frame_stems(case: str, frames: int) -> list[str]:
    """A case's frame stems in the official evaluator's order. A case's frames come from two recorded
    clips whose date/id prefixes do not sort the way their clip numbers do, so natural name order differs
    from the official one; within a clip the annotation index `a` then the image number go up."""
    number = int(case.split("_")[0].removeprefix("case"))
    clips = [("20190305142511", "0U99"), ("20181001100941", "0U62")]  # second clip sorts first by name
    stems = []
    for k in range(frames):
        part = 1 + (k * 2) // frames  # first half of the frames from clip part 001, then 002
        date, ident = clips[part - 1]
        stems.append(
            f"case_M_{date}_{ident}{number:04d}_1_005_{part:03d}-1_a{1 + k % 3}_ayy_image{k + 1:04d}"
        )
    return stems


def write_sunseg(root: Path, frames: int = 6, size: int = 64, seed: int = 0, splits=SPLIT_CASES) -> Path:
    """Write SUN-SEG's tree under `root` (the SUN-SEG folder); return it."""
    rng = np.random.default_rng(seed)
    for split, cases in splits.items():
        lines, boxes = [], {}
        for i, case in enumerate(cases):
            for stem in frame_stems(case, frames):
                frame, mask = frame_and_mask(rng, size)
                save(frame, root / split / "Frame" / case / f"{stem}.jpg")
                save(mask, root / split / "GT" / case / f"{stem}.png")
                for weak in ("Edge", "Scribble", "Polygon"):
                    save(mask // 2, root / split / weak / case / f"{stem}.png")
                lines.append(f"{case}/{stem}.jpg\t{CLASSES[i % len(CLASSES)]}")
                ys, xs = np.nonzero(mask)
                boxes[f"{case}/{stem}.jpg"] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        (root / split / "Classification").mkdir(parents=True)
        (root / split / "Classification" / "classification.txt").write_text("\n".join(lines) + "\n")
        (root / split / "Detection").mkdir(parents=True)
        (root / split / "Detection" / "bbox_annotation.json").write_text(json.dumps(boxes))
    return root
