"""Published dataset layouts: which one a folder holds, the splits it has, and each split's sequences as
files (nothing decoded). One module per layout; `READERS` is the one list of them, in the order `auto`
tries them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from autosam2.config import Layout
from autosam2.data.layouts import images, polyp_gen, polypgen, sunseg
from autosam2.data.layouts.files import FrameFiles, Problem, SequenceFiles
from autosam2.errors import DatasetError

__all__ = [
    "READERS",
    "FrameFiles",
    "Problem",
    "Reader",
    "SequenceFiles",
    "clean_split",
    "detect",
    "reader",
    "scan",
]

Scan = tuple[list[SequenceFiles], list[Problem]]
PURPOSES = ("train", "valid", "test")


@dataclass(frozen=True)
class Reader:
    """One layout: whether a root holds it, its splits, a split's files, and the split each purpose reads
    by default (`defaults`: train / valid / test -> split name)."""

    layout: Layout
    looks_like: Callable[[Path], bool]
    splits: Callable[[Path], list[str]]
    scan: Callable[[Path, str], Scan]
    defaults: Mapping[str, str]
    release: str  # the published release and document the reader follows

    def default_split(self, root: Path, purpose: str) -> str:
        """The split `purpose` reads when none is named: the layout's default, or the only split there is."""
        split = self.defaults.get(purpose)
        present = self.splits(root)
        if split is None and len(present) == 1:
            return present[0]
        if split in present:
            return split
        named = ", ".join(present) or "none"
        raise DatasetError(
            f"{root}: no {purpose} split{f' {split!r}' if split else ''} in this {self.layout} folder "
            f"(splits: {named}); name one with {_SPLIT_FLAGS.get(purpose, '--split')}"
        )


# how each purpose's split is named: training's in its config (or train's flags), the commands' by --split
_SPLIT_FLAGS = {
    "train": "data.train_split (train --train-split; shards build --split)",
    "valid": "--split (training: data.valid_split)",
}


READERS: dict[Layout, Reader] = {
    Layout.sunseg: Reader(
        Layout.sunseg, sunseg.looks_like, sunseg.splits, sunseg.scan, sunseg.DEFAULT_SPLITS, sunseg.RELEASE
    ),
    Layout.polypgen: Reader(
        Layout.polypgen,
        polypgen.looks_like,
        polypgen.splits,
        polypgen.scan,
        polypgen.DEFAULT_SPLITS,
        polypgen.RELEASE,
    ),
    # before polyp_gen, whose test for a split (a folder holding images/) a set's parent passes too
    Layout.images: Reader(
        Layout.images, images.looks_like, images.splits, images.scan, images.DEFAULT_SPLITS, images.RELEASE
    ),
    Layout.polyp_gen: Reader(
        Layout.polyp_gen,
        polyp_gen.looks_like,
        polyp_gen.splits,
        polyp_gen.scan,
        polyp_gen.DEFAULT_SPLITS,
        polyp_gen.RELEASE,
    ),
}


def check_root(root: str | Path) -> Path:
    """`root`, when it is a folder; one DatasetError line when it is a file or missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: {'is a file, not a dataset folder' if root.exists() else 'dataset root does not exist'}"
        )
    return root


def detect(root: str | Path) -> Layout:
    """The layout of a dataset folder, told by its folders; one DatasetError line when none fits."""
    root = check_root(root)
    for layout, found in READERS.items():
        if found.looks_like(root):
            return layout
    names = ", ".join(layout.value for layout in READERS)
    raise DatasetError(f"{root}: not a dataset folder in a known layout ({names}); see docs/data.md")


def reader(root: str | Path, layout: Layout | str = Layout.auto) -> Reader:
    """The reader of `root`: the one `layout` names, or the detected one for auto."""
    layout = Layout(layout)
    if layout == Layout.auto:
        layout = detect(root)
    if layout not in READERS:
        raise DatasetError(f"{root}: layout {layout} has no reader in this version")
    return READERS[layout]


def split_name(root: str | Path, layout: Layout | str, split: str | None, purpose: str) -> str:
    """`split`, or the one `purpose` reads by default in `root`'s layout; one DatasetError listing the
    splits there are when `split` is none of them (nor another folder inside the dataset)."""
    root = check_root(root)
    found = reader(root, layout)
    present = found.splits(root)
    if not present:
        raise DatasetError(f"{root}: not a {found.layout} folder ({_what_it_is(root)}); see docs/data.md")
    if not split:
        return found.default_split(root, purpose)
    try:
        name = clean_split(root, split)
    except DatasetError:
        name = None
    if name is None or (name not in present and not (root / name).is_dir()):
        raise DatasetError(
            f"{root}: no split {split!r} in this {found.layout} folder (splits: {', '.join(present) or 'none'})"
        )
    return name


def scan(root: str | Path, split: str, layout: Layout | str = Layout.auto) -> Scan:
    """Index one split of `root` from file names alone; the sequences and every problem found."""
    root = Path(root)
    found = reader(root, layout)
    split = clean_split(root, split)
    sequences, problems = found.scan(root, split)
    unsafe = [s for s in sequences if not _inside(s.name)]
    where = root / split if (root / split).is_dir() else root  # a split need not be a folder
    problems += [
        Problem(
            where,
            f"sequence {s.name!r}: a name outputs named after it would write outside their folder",
        )
        for s in unsafe
    ]
    return [s for s in sequences if s not in unsafe], problems


def _inside(name: str) -> bool:
    """Whether a folder named `name` under another stays inside it (no '..', not absolute, not empty)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and path.as_posix() != "."


def clean_split(root: Path, split: str) -> str:
    """`split` as the layout names it (`TestEasyDataset/Unseen/` and `./TestEasyDataset//Unseen` are
    `TestEasyDataset/Unseen`); one DatasetError when it names no folder inside the dataset (empty, the
    root itself, absolute, or through `..`)."""
    path = PurePosixPath(split or "")
    if not split or path.is_absolute() or ".." in path.parts or path.as_posix() == ".":
        raise DatasetError(f"{root}: split {split!r} is not a folder name inside the dataset")
    return path.as_posix()


def _what_it_is(root: Path) -> str:
    """The layout `root`'s folders tell, in words, for an error about another layout."""
    try:
        return f"its folders are in the {detect(root)} layout; name that with --layout"
    except DatasetError:
        return "nor in any other known layout"


def layouts_markdown() -> str:
    """The layouts as a Markdown table (docs/data.md holds it): name, release followed, default splits."""
    rows = [
        "| `--layout` | reads (the release followed) | train / valid / test split by default |",
        "|---|---|---|",
    ]
    for layout, found in READERS.items():
        defaults = " / ".join(f"`{found.defaults[p]}`" if p in found.defaults else "-" for p in PURPOSES)
        rows.append(f"| `{layout}` | {found.release} | {defaults} |")
    return "\n".join(rows) + "\n"
