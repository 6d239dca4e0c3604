"""SUN-SEG (the SUN-SEG/VPS repository's docs/DATA_PREPARATION.md, annotation release v2, after its
re-organisation step): ``ROOT/TrainDataset/{Frame,GT}/<case>/<name>``, ``ROOT/TestEasyDataset/{Seen,Unseen}/
{Frame,GT}/...`` and ``ROOT/TestHardDataset/{Seen,Unseen}/...``; frames ``.jpg``, masks ``.png`` of the same
stem. A split is named by its folders (``TrainDataset``, ``TestEasyDataset/Unseen``, ...). Edge, Scribble,
Polygon and Detection are not read; ``Classification/classification.txt`` (a frame and its pathology class
per line) is read into each frame's labels as ``pathology``.

A case's frames are in the official evaluator's order: by the number before '-', the number after '_a' and
the number after '_image' of the file name (``case_M_20181001100941_0U62372100109341_1_005_001-1_a2_ayy_
image0001.jpg``); a case with no name in that pattern is in natural order, a name outside it among names
in it is a problem.
"""

from __future__ import annotations

from pathlib import Path

from autosam2.data.layouts.files import Problem, SequenceFiles, natural_key, pair_folder, say_once, subfolders

TRAIN = "TrainDataset"
TESTS = ("TestEasyDataset/Seen", "TestEasyDataset/Unseen", "TestHardDataset/Seen", "TestHardDataset/Unseen")
DEFAULT_SPLITS = {"train": TRAIN, "valid": TESTS[0], "test": TESTS[0]}
RELEASE = "SUN-SEG annotation v2 (GewelsJI/VPS docs/DATA_PREPARATION.md, re-organised Frame/GT tree)"
CLASSIFICATION = Path("Classification") / "classification.txt"


def official_key(stem: str) -> tuple[int, int, int] | None:
    """The evaluator's sort key of a frame stem, or None when the name is outside its pattern."""
    try:
        return (
            int(stem.split("-")[0].split("_")[-1]),
            int(stem.split("_a")[1].split("_")[0]),
            int(stem.split("_image")[1]),
        )
    except (IndexError, ValueError):
        return None


def frame_order(stems: list[str]) -> list[str]:
    """A case's frame stems in the official evaluator's order (natural order when a name does not fit)."""
    keys = [official_key(s) for s in stems]
    if all(k is not None for k in keys):
        return [s for _, s in sorted(zip(keys, stems, strict=True))]
    return sorted(stems, key=natural_key)


def splits(root: Path) -> list[str]:
    """The split folders of `root` that hold ``Frame/``."""
    found = [TRAIN] if (root / TRAIN / "Frame").is_dir() else []
    return found + [s for s in TESTS if (root / s / "Frame").is_dir()]


def looks_like(root: Path) -> bool:
    return bool(splits(root))


def read_classes(split_dir: Path) -> dict[str, str]:
    """Pathology class per frame (keyed by ``<case>/<stem>`` and by stem) from classification.txt; lines
    that hold no frame and class, or a file that is not text, are said once and not read (the classes are
    labels users filter on, not what training or scoring needs)."""
    path = split_dir / CLASSIFICATION
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        say_once(f"{path}: not read ({type(err).__name__}: {err}); frames carry no pathology label")
        return {}
    classes, odd = {}, []
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) >= 2:
            name = Path(parts[0])
            classes[str(name.with_suffix(""))] = parts[1]
            classes.setdefault(name.stem, parts[1])
        elif parts:
            odd.append(number)
    if odd:
        say_once(f"{path}: {len(odd)} line(s) are not '<frame> <class>' (first: line {odd[0]}); not read")
    return classes


def scan(root: Path, split: str) -> tuple[list[SequenceFiles], list[Problem]]:
    """Index one split: every case of ``Frame/`` paired with ``GT/`` by stem, frames in the official order."""
    split_dir = root / split
    frame_root = split_dir / "Frame"
    if not frame_root.is_dir():
        inner = [s for s in splits(root) if s.startswith(f"{split}/")]
        held = f" (it holds the splits {', '.join(inner)}: name one)" if inner else ""
        return [], [Problem(frame_root, f"split {split!r} has no Frame folder{held}")]
    cases = subfolders(frame_root)
    if not cases:
        return [], [Problem(frame_root, "holds no case folder")]
    classes = read_classes(split_dir)
    sequences, problems = [], []
    for case in cases:
        sequence, found = pair_folder(case, frame_root / case, split_dir / "GT" / case, order=lambda s: s)
        problems += found
        if sequence is None:
            continue
        problems += _outside_the_pattern(sequence)
        stems = frame_order([f.name for f in sequence.frames])
        by_stem = {f.name: f for f in sequence.frames}
        frames = tuple(_labelled(by_stem[s], case, classes) for s in stems)
        sequences.append(SequenceFiles(case, frames))
    return sequences, problems


def _labelled(frame, case: str, classes: dict[str, str]):
    label = classes.get(f"{case}/{frame.name}") or classes.get(frame.name)
    return frame if label is None else type(frame)(frame.name, frame.image, frame.mask, {"pathology": label})


def _outside_the_pattern(sequence: SequenceFiles) -> list[Problem]:
    """A problem per frame whose name the official order cannot place, in a case whose other names fit
    (a case with no name in the pattern is read in natural order)."""
    odd = [f for f in sequence.frames if official_key(f.name) is None]
    if len(odd) == len(sequence.frames):
        return []
    return [
        Problem(
            f.image,
            "name outside SUN-SEG's pattern (..._<n>-1_a<k>_..._image<m>): the official frame order cannot place it",
        )
        for f in odd
    ]
