"""PolypGen as its Synapse release ``PolypGen2021_MultiCenterData_v3`` unpacks (the folder's tree, file
names and quirks as published scans of the release record them; see docs/data.md, "PolypGen"):

    data_C<n>/images_C<n>/<stem>.jpg, masks_C<n>/<stem>_mask.jpg, bbox_C<n>/*.txt,
        bbox_image_C<n>/*_bbox.jpg (``bbox_images_C6`` in C6)
    sequenceData/positive/seq<k>/{images,masks,bbox,bbox_image}_seq<k>/
    sequenceData/negativeOnly/seq<k>_neg/<frame>.jpg          (no masks)
    imagesAll_positive/, dataDetails_PolypGen_SingleFrames/, readme.md, license.txt

Everything is JPEG, masks too (RGB in C1 and the sequences, greyscale elsewhere). Kept from the release:
C3's image ``C3_EndoCV2021_00489_.jpg`` whose mask is ``C3_EndoCV2021_00489_mask.jpg``; empty masks among
single frames and in positive sequences (seq1's are all empty); bbox ``.txt`` files inside
``masks_seq2``; an overlay in ``bbox_image_C1`` without a frame; single frames of one centre in several
sizes; ``.DS_Store`` files. The stems of C4..C6 and of the negative frames follow the release's pattern
where it is recorded and are otherwise illustrative: the reader relies on no name beyond the pairing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.layout_fixtures import frame_and_mask, save

CENTRES = {
    "C1": ["100H0050", "326OLCV1_100H0006", "326OLCV1_100H0010"],
    "C2": ["EndoCV2021_001000", "EndoCV2021_001010", "EndoCV2021_001359"],
    "C3": ["C3_EndoCV2021_0054", "C3_EndoCV2021_00238", "C3_EndoCV2021_00489_"],
    "C4": ["C4_EndoCV2021_0001", "C4_EndoCV2021_0002"],
    "C5": ["C5_EndoCV2021_0001", "C5_EndoCV2021_0002"],
    "C6": ["C6_0001", "C6_0002"],
}
EMPTY_SINGLE = {"C4_EndoCV2021_0002"}  # single frames whose mask holds no polyp
SMALLER = {"EndoCV2021_001359"}  # a frame of another size than its centre's others
POSITIVE = {"seq1": 3, "seq2": 4, "seq10": 3}  # frames per sequence; seq1's masks are all empty
NEGATIVE = {"seq1_neg": [1, 2, 10], "seq2_neg": [3, 4], "seq10_neg": [1, 2]}  # frame numbers


def mask_name(stem: str) -> str:
    """A frame's mask file; C3's one stem ending in '_' shares it with the suffix."""
    return f"{stem.removesuffix('_')}_mask.jpg"


def positive_stems(seq: str, frames: int) -> list[str]:
    """A positive sequence's frame stems in natural order (``0_endocv2021_positive_167`` in seq1)."""
    number = int(seq.removeprefix("seq"))
    return [f"{number - 1}_endocv2021_positive_{k}" for k in range(8, 8 + frames)]  # 8, 9, 10: natural order


def _bbox_line(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    return f"polyp {xs.min()} {ys.min()} {xs.max()} {ys.max()}\n" if len(xs) else "\n"


def _write_centre(root: Path, centre: str, rng: np.random.Generator, size: int) -> None:
    base = root / f"data_{centre}"
    overlays = "bbox_images_C6" if centre == "C6" else f"bbox_image_{centre}"
    for stem in CENTRES[centre]:
        side = size * 3 // 4 if stem in SMALLER else size
        frame, mask = frame_and_mask(rng, side, polyp=stem not in EMPTY_SINGLE)
        save(frame, base / f"images_{centre}" / f"{stem}.jpg")
        save(np.dstack([mask] * 3) if centre == "C1" else mask, base / f"masks_{centre}" / mask_name(stem))
        box_stem = stem if centre in ("C2", "C3") else f"{stem}_mask"
        if stem != "C3_EndoCV2021_00489_":  # the release lacks this frame's box
            (base / f"bbox_{centre}").mkdir(parents=True, exist_ok=True)
            (base / f"bbox_{centre}" / f"{box_stem}.txt").write_text(_bbox_line(mask))
            save(frame, base / overlays / f"{box_stem}_bbox.jpg")
    if centre == "C1":
        save(frame, base / overlays / "957OLCV1_100H0002_mask_bbox.jpg")
    (base / ".DS_Store").write_bytes(b"\0")


def _write_positive(root: Path, rng: np.random.Generator, size: int) -> None:
    for seq, frames in POSITIVE.items():
        base = root / "sequenceData" / "positive" / seq
        for stem in positive_stems(seq, frames):
            frame, mask = frame_and_mask(rng, size, polyp=seq != "seq1")
            save(frame, base / f"images_{seq}" / f"{stem}.jpg")
            save(frame, root / "imagesAll_positive" / f"{stem}.jpg")
            save(np.dstack([mask] * 3), base / f"masks_{seq}" / mask_name(stem))
            (base / f"bbox_{seq}").mkdir(parents=True, exist_ok=True)
            (base / f"bbox_{seq}" / f"{stem}.txt").write_text(_bbox_line(mask))
            if seq == "seq2":
                (base / f"masks_{seq}" / f"{stem}.txt").write_text(_bbox_line(mask))
            save(frame, base / f"bbox_image_{seq}" / f"{stem}_bbox.jpg")


def write_polypgen(root: Path, size: int = 64, seed: int = 0) -> Path:
    """Write PolypGen's tree under `root` (the PolypGen2021_MultiCenterData_v3 folder); return it."""
    rng = np.random.default_rng(seed)
    for centre in CENTRES:
        _write_centre(root, centre, rng, size)
    _write_positive(root, rng, size)
    for seq, numbers in NEGATIVE.items():
        number = seq.removeprefix("seq").removesuffix("_neg")
        for k in numbers:
            frame, _ = frame_and_mask(rng, size, polyp=False)
            save(frame, root / "sequenceData" / "negativeOnly" / seq / f"seq{number}_img{k}.jpg")
    (root / "sequenceData" / "negativeOnly" / ".DS_Store").write_bytes(b"\0")
    details = root / "dataDetails_PolypGen_SingleFrames"
    details.mkdir()
    for centre in list(CENTRES)[:5]:  # the release has no C6 table
        rows = [f"{stem}.jpg,1" for stem in CENTRES[centre]]
        (details / f"dataDetails_{centre}.csv").write_text("imageName,annotations\n" + "\n".join(rows) + "\n")
    (root / "readme.md").write_text("# PolypGen2021_MultiCenterData_v3\n")
    (root / "license.txt").write_text("CC BY 4.0\n")
    return root
