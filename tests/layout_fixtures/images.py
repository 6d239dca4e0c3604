"""Flat image sets as they are distributed:

- Kvasir-SEG (datasets.simula.no/kvasir-seg, kvasir-seg.zip): ``Kvasir-SEG/images/<id>.jpg``,
  ``Kvasir-SEG/masks/<id>.jpg`` (JPEG masks, so grey compression noise), ``Kvasir-SEG/kavsir_bboxes.json``;
  ids like ``cju0qkwl35piu0993l0dewei2``, frames of several sizes.
- CVC-ClinicDB's own release (polyp.grand-challenge.org/CVCClinicDB): ``CVC-ClinicDB/Original/<n>.tif``,
  ``CVC-ClinicDB/Ground Truth/<n>.tif``, frames numbered from 1, all of one size.
- PraNet's data (DengPingFan/PraNet README, MyTrain.py, MyTest.py): ``TrainDataset/{images,masks}/`` and
  ``TestDataset/{CVC-300,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB,Kvasir}/{images,masks}/``, all
  ``.png``; CVC and ETIS frames numbered, Kvasir frames by their Kvasir-SEG id.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

from tests.layout_fixtures import frame_and_mask, save

PRANET_TESTS = ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "Kvasir")


def kvasir_ids(rng: np.random.Generator, count: int) -> list[str]:
    """Ids shaped like Kvasir-SEG's (``cju`` and 22 lower-case letters and digits)."""
    letters = np.array(list(string.ascii_lowercase + string.digits))
    return ["cju" + "".join(rng.choice(letters, 22)) for _ in range(count)]


def write_pairs(
    images: Path, masks: Path, stems: list[str], suffix: str, rng, sizes=(48,)
) -> list[np.ndarray]:
    """One frame and its mask per stem (3-channel masks in .jpg and .tif, 0/255 greyscale in .png);
    return the masks."""
    written = []
    for i, stem in enumerate(stems):
        frame, mask = frame_and_mask(rng, sizes[i % len(sizes)])
        save(frame, images / f"{stem}{suffix}")
        save(np.stack([mask] * 3, axis=-1) if suffix in (".jpg", ".tif") else mask, masks / f"{stem}{suffix}")
        written.append(mask)
    return written


def write_kvasir(parent: Path, frames: int = 4, seed: int = 0) -> Path:
    """Kvasir-SEG as unzipped under `parent`; return its folder."""
    rng = np.random.default_rng(seed)
    root = parent / "Kvasir-SEG"
    stems = kvasir_ids(rng, frames)
    boxes = {}
    masks = write_pairs(root / "images", root / "masks", stems, ".jpg", rng, (48, 40, 56))
    for stem, mask in zip(stems, masks, strict=True):
        ys, xs = np.nonzero(mask)
        box = {
            "label": "polyp",
            "xmin": int(xs.min()),
            "ymin": int(ys.min()),
            "xmax": int(xs.max()),
            "ymax": int(ys.max()),
        }
        boxes[stem] = {"height": mask.shape[0], "width": mask.shape[1], "bbox": [box]}
    (root / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return root


def write_cvc_clinicdb(parent: Path, frames: int = 6, seed: int = 1) -> Path:
    """CVC-ClinicDB's own release under `parent`: Original/ and Ground Truth/, ``<n>.tif``; its folder."""
    rng = np.random.default_rng(seed)
    root = parent / "CVC-ClinicDB"
    write_pairs(root / "Original", root / "Ground Truth", [str(n) for n in range(1, frames + 1)], ".tif", rng)
    return root


def write_pranet(parent: Path, frames: int = 3, seed: int = 2) -> Path:
    """PraNet's ``data/`` under `parent`: TrainDataset and the five TestDataset sets; return ``data``."""
    rng = np.random.default_rng(seed)
    root = parent / "data"
    firsts = {"CVC-300": 149, "CVC-ClinicDB": 25, "CVC-ColonDB": 1, "ETIS-LaribPolypDB": 1}
    for name in PRANET_TESTS:
        stems = (
            kvasir_ids(rng, frames) if name == "Kvasir" else [str(firsts[name] + k) for k in range(frames)]
        )
        write_pairs(
            root / "TestDataset" / name / "images", root / "TestDataset" / name / "masks", stems, ".png", rng
        )
    train = [str(n) for n in range(1, frames + 1)] + kvasir_ids(rng, frames)
    write_pairs(root / "TrainDataset" / "images", root / "TrainDataset" / "masks", train, ".png", rng)
    return root


def write_sequences_csv(set_dir: Path, rows: list[tuple[str, str]], header: str = "frame,sequence") -> Path:
    """A set's ``sequences.csv``: the header, then one ``frame,sequence`` row each."""
    path = set_dir / "sequences.csv"
    path.write_text("\n".join([header, *(f"{frame},{sequence}" for frame, sequence in rows)]) + "\n")
    return path
