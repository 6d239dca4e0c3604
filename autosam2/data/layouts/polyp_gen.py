"""The seed's polyp_gen layout: ``ROOT/<split>/{images,masks}/<sequence>/<frame>.jpg``.

Any folder of ROOT holding ``images/`` is a split (``train``, ``valid``, ``test`` or any other name). A
split's list file (``train/train_list.txt``, ``valid/val_list.txt``, otherwise ``<split>/<split>_list.txt``)
names its sequences one per line, ``#`` comments allowed; without one, every sequence folder of
``images/`` is read (said once). Frames follow the natural order of their names; a mask pairs with the
image of the same stem.
"""

from __future__ import annotations

from pathlib import Path

from autosam2.data.layouts.files import Problem, SequenceFiles, pair_folder, say_once, subfolders

LIST_FILES = {"train": "train_list.txt", "valid": "val_list.txt"}
DEFAULT_SPLITS = {"train": "train", "valid": "valid", "test": "test"}
RELEASE = "the seed project's polyp_gen layout (ROOT/<split>/{images,masks}/<sequence>/<frame>)"


def list_file(root: Path, split: str) -> Path:
    """Where `split`'s list file lies."""
    return Path(root) / split / LIST_FILES.get(split, f"{Path(split).name}_list.txt")


def looks_like(root: Path) -> bool:
    return bool(splits(root))


def splits(root: Path) -> list[str]:
    """The folders of `root` that hold an ``images/`` folder of sequence folders."""
    return [name for name in subfolders(root) if (root / name / "images").is_dir()]


def read_list_file(root: Path, split: str) -> tuple[list[str] | None, list[Problem]]:
    """The sequences a list file names (None: there is none), and its problems."""
    path = list_file(root, split)
    if not path.is_file():
        return None, []
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        return [], [Problem(path, "list file names no sequence")]
    problems = [
        Problem(path, f"sequence {name!r} is listed more than once")
        for name in sorted({n for n in names if names.count(n) > 1})
    ]
    return list(dict.fromkeys(names)), problems


def scan(root: Path, split: str) -> tuple[list[SequenceFiles], list[Problem]]:
    """Index one split from the file names alone (no decoding); return the index and every problem."""
    image_root = root / split / "images"
    if not image_root.is_dir():
        return [], [Problem(image_root, f"split {split!r} has no images folder")]
    names, problems = read_list_file(root, split)
    listed = names is not None
    if names is None:
        names = subfolders(image_root)
        if not names:
            return [], [Problem(image_root, "holds no sequence folder")]
        say_once(
            f"{root / split}: no {list_file(root, split).name}; reading all {len(names)} sequence folders"
        )
    sequences = []
    for name in names:
        image_dir = image_root / name
        if not image_dir.is_dir():
            why = f"is listed in {list_file(root, split).name} but has" if listed else "has"
            problems.append(Problem(image_dir, f"sequence {name!r} {why} no images folder"))
            continue
        sequence, found = pair_folder(name, image_dir, root / split / "masks" / name)
        problems += found
        if sequence is not None:
            sequences.append(sequence)
    return sequences, problems
