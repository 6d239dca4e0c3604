"""Scoring saved masks of any method: frames paired by name, read the way the SUN-SEG/VPS toolbox reads
them, scored by the one `MetricAccumulator`.

Layout, for predictions and ground truth alike: ``<root>/<sequence>/<frame>.png|jpg`` (a polyp_gen masks
folder, or the toolbox's ``Pred/<method>/<dataset>`` and ``<dataset>/GT``; a root holding a ``GT`` folder
is read from it). Sequences are the ground truth's folders; frames pair by file stem, in natural order
of their names. Ground truth may instead be one split of a dataset folder in its layout
(`layout_truth`: SUN-SEG's ``GT/<case>/<stem>.png`` in the official evaluator's frame order), the
predictions then ``<pred>/<case>/<stem>.png``. Files are read as 8-bit grayscale with OpenCV and a prediction of another size is
resized to its ground truth's with ``cv2.resize`` (bilinear), exactly as ``eval/vps_evaluator.py`` does.
The sunseg mode drops each sequence's first and last ground-truth frame before pairing, as the toolbox
does (their predictions are never read).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from autosam2.data.layouts.files import natural_key
from autosam2.errors import DatasetError
from autosam2.eval.report import listed
from autosam2.metrics import GT_THRESHOLD_8BIT, MetricAccumulator, Mode, too_short_for_the_drop

SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class PolypFree:
    """The ground truth of a frame its layout calls polyp-free without a mask file (PolypGen's
    negative-only frames): all background, at the frame's size."""

    image: Path

    @property
    def parent(self) -> Path:
        return self.image.parent

    def __str__(self) -> str:
        return f"{self.image} (polyp-free, no mask file)"


@dataclass
class Sequence:
    """One sequence's frames to score, in order: (ground truth file, prediction file)."""

    name: str
    frames: list[tuple[Path | PolypFree, Path]] = field(default_factory=list)


@dataclass
class Pairing:
    """What `pair_frames` found: the sequences to score, one line per missing or extra file, and why each
    sequence with no frame to score is left out (by name)."""

    sequences: list[Sequence]
    missing: list[str]
    too_short: dict[str, str] = field(default_factory=dict)  # the first/last drop left no frame
    unpaired: dict[str, str] = field(default_factory=dict)  # no prediction, or no ground-truth frame

    @property
    def left_out(self) -> dict[str, str]:
        return dict(sorted({**self.unpaired, **self.too_short}.items(), key=lambda kv: natural_key(kv[0])))


def ground_truth_root(path: str | Path) -> Path:
    """`path`, or its ``GT`` folder when it is a toolbox dataset folder (``<dataset>/GT/<sequence>/``)."""
    path = Path(path)
    return path / "GT" if (path / "GT").is_dir() else path


def _images(folder: Path, problems: list[str]) -> dict[str, Path]:
    """Image files of a folder by stem; two files of one stem (a.png and a.jpg) are a problem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            problems.append(f"{path}: two files for frame {path.stem} ({found[path.stem].name} too)")
            continue
        found[path.stem] = path
    return found


def _folders(root: Path) -> list[str]:
    return sorted((p.name for p in root.iterdir() if p.is_dir()), key=natural_key)


# the ground truth to score against: sequence -> its frames in order, (stem, mask file)
Truth = dict[str, list[tuple[str, Path | PolypFree]]]


def tree_truth(gt_root: Path, problems: list[str]) -> Truth:
    """The ground truth of a ``<gt>/<sequence>/<frame>`` tree, frames in the toolbox's order: SUN-SEG's
    names by the official evaluator's key, other names in natural order."""
    from autosam2.data.layouts.sunseg import frame_order

    truth = {}
    for name in _folders(gt_root):
        gts = _images(gt_root / name, problems)
        truth[name] = [(stem, gts[stem]) for stem in frame_order(list(gts))]
    return truth


def layout_truth(root: str | Path, layout: str, split: str | None) -> Truth:
    """The ground truth of one split of a dataset folder (None: its layout's valid split), frames in the
    layout's order; one DatasetError when the folder is in no layout or the split is not there, or
    listing the split's problems. A frame its layout calls polyp-free without a mask file is scored
    against an empty mask, as `evaluate` scores it."""
    from autosam2.data.layouts import scan, split_name

    split = split_name(root, layout, split, "valid")
    sequences, problems = scan(root, split, layout)
    if problems:
        raise DatasetError("\n".join(listed([str(p) for p in problems])))
    return {s.name: [(f.name, f.mask or PolypFree(f.image)) for f in s.frames] for s in sequences}


def _roots(pred_root: Path, gt_root: Path, truth: Truth | None, problems: list[str]) -> Truth:
    """Both roots are folders; the ground truth (`truth`, or read from the tree) has a sequence."""
    for role, root in (("--pred", pred_root), ("--gt", gt_root)):
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder ({role} takes <root>/<sequence>/<frame>.png|jpg)")
    truth = tree_truth(gt_root, problems) if truth is None else truth
    if not truth:
        raise DatasetError(f"{gt_root}: no sequence folders (<sequence>/<frame>.png|jpg)")
    return truth


def pair_frames(
    pred_root: str | Path, gt_root: str | Path, drop_first_last: bool, truth: Truth | None = None
) -> Pairing:
    """Pair every ground-truth frame (of the ``<gt>/<sequence>/`` tree, or of `truth`) with the
    prediction of the same stem. Raises DatasetError when a root is not a folder of sequence folders, or
    two files claim one frame."""
    pred_root = Path(pred_root)
    gt_root = Path(gt_root) if truth is not None else ground_truth_root(gt_root)
    problems: list[str] = []
    names = list(truth := _roots(pred_root, gt_root, truth, problems))
    missing: list[str] = []
    too_short: dict[str, str] = {}
    unpaired: dict[str, str] = {}
    sequences = []
    for name in names:
        gts = dict(truth[name])
        ordered = [stem for stem, _ in truth[name]]
        kept = ordered[1:-1] if drop_first_last else ordered
        if ordered and not kept:
            too_short[name] = too_short_for_the_drop(len(ordered))
        pred_dir = pred_root / name
        if not pred_dir.is_dir():
            missing.append(
                f"{pred_dir}: missing (the ground truth has sequence {name}, {len(ordered)} frames)"
            )
            if name not in too_short:
                unpaired[name] = "no prediction folder"
            continue
        preds = _images(pred_dir, problems)
        sequence = Sequence(name)
        for stem in kept:
            if stem in preds:
                sequence.frames.append((gts[stem], preds[stem]))
            else:
                missing.append(f"{pred_dir / stem}.png: missing (ground truth {gts[stem]})")
        where = gts[ordered[0]].parent if ordered else gt_root / name
        missing += [
            f"{preds[s]}: no ground truth for it in {where}"
            for s in sorted(set(preds) - set(gts), key=natural_key)
        ]
        if sequence.frames:
            sequences.append(sequence)
        elif kept:
            unpaired[name] = f"no prediction for any of its {len(kept)} frames"
        elif not ordered:
            unpaired[name] = "no ground-truth frame"
    missing += [
        f"{pred_root / n}: a sequence the ground truth does not have"
        for n in _folders(pred_root)
        if n not in names
    ]
    if problems:
        raise DatasetError("\n".join(listed(problems)))
    return Pairing(sequences, missing, too_short, unpaired)


def read_gray(path: Path | PolypFree):
    """An 8-bit grayscale image as the toolbox reads it (``cv2.imread(path, cv2.IMREAD_GRAYSCALE)``);
    a polyp-free frame's ground truth as zeros of the frame's size."""
    import cv2

    if isinstance(path, PolypFree):
        return 0 * read_gray(path.image)
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DatasetError(f"{path}: unreadable (not an image OpenCV can decode)")
    return image


@dataclass
class Scored:
    """One sequence scored: its accumulator, and the lines to say (resized predictions) or to fail on."""

    name: str
    metrics: MetricAccumulator
    notes: list[str]
    errors: list[str]


def score_sequence(sequence: Sequence, mode: Mode) -> Scored:
    """Read and score the frames of one sequence (a process of its own may run this)."""
    import cv2

    metrics = MetricAccumulator(mode=mode, drop_first_last=False)  # dropped when paired, as the toolbox
    errors: list[str] = []
    resized: Counter[tuple[tuple[int, int], tuple[int, int]]] = Counter()  # (pred, gt) shapes
    for gt_path, pred_path in sequence.frames:
        try:
            gt, pred = read_gray(gt_path), read_gray(pred_path)
        except DatasetError as err:
            errors.append(str(err))
            continue
        if gt.max() == 1:
            errors.append(
                f"{gt_path}: a 0/1 label map (values 0 and 1): masks are 0..255 with foreground above "
                f"{GT_THRESHOLD_8BIT}; save them as 0/255"
            )
            continue
        if pred.shape != gt.shape:
            resized[pred.shape, gt.shape] += 1
            pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]))
        metrics.add_map(sequence.name, pred, gt)
    notes = [_resized_note(sequence, resized)] if resized else []
    return Scored(sequence.name, metrics, notes, errors)


def _size(shape: tuple[int, int]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _resized_note(sequence: Sequence, resized: Counter) -> str:
    """One line for a sequence's resized predictions: how many of each size, and the ground truth's."""
    by_pred: Counter[tuple[int, int]] = Counter()
    for (pred, _), n in resized.items():
        by_pred[pred] += n
    (shape, n), *rest = by_pred.most_common()
    counts = [f"{n} prediction{'s' if n > 1 else ''} {'are' if n > 1 else 'is'} {_size(shape)}"]
    counts += [f"{m} {'are' if m > 1 else 'is'} {_size(other)}" for other, m in rest]
    truths = sorted({_size(gt) for _, gt in resized})
    return (
        f"{sequence.frames[0][1].parent}: {', '.join(counts)}, the ground truth {' or '.join(truths)}: "
        "resized to the ground truth's size (bilinear, as the toolbox does)"
    )


def score_all(
    sequences: list[Sequence],
    mode: Mode,
    workers: int = 1,
    progress: Callable[[Iterable[Scored], int], Iterable[Scored]] = lambda items, total: items,
) -> MetricAccumulator:
    """Every sequence scored (over `workers` processes), merged into one accumulator. Unreadable files
    and 0/1 label maps raise one DatasetError naming each (one a line, up to ``report.MAX_LISTED``);
    resizes are said on stderr, one line a sequence."""
    merged = MetricAccumulator(mode=mode, drop_first_last=False)
    errors: list[str] = []
    todo = [s for s in sequences if s.frames]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            results = progress(pool.map(score_sequence, todo, [mode] * len(todo)), len(todo))
            done = list(results)
    else:
        done = list(progress((score_sequence(s, mode) for s in todo), len(todo)))
    for scored in done:
        for note in scored.notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        errors += scored.errors
        merged.merge(scored.metrics)
    if errors:
        raise DatasetError("\n".join([*listed(errors), f"{len(errors)} file(s) cannot be scored"]))
    return merged
