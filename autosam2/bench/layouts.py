"""`autosam2 bench layouts`: the same frames written in each layout a writer is here for; the time and
peak memory of `validate` and `inspect` over each (each in a process of its own: the work's seconds,
imports not counted, the process's peak RSS and what the work added to it), and `shards build`'s frames/s
from each relative to the polyp_gen layout (measured in the same run, in turns, the best of --repeats)."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from autosam2.arguments import positive_int
from autosam2.config import Layout
from autosam2.errors import OutputRefused

SEQUENCE_FRAMES = 100  # frames per sequence of the fixture


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames", type=positive_int, default=10_000, help="frames per layout (default 10000)"
    )
    parser.add_argument("--size", type=positive_int, default=64, help="frame side in pixels (default 64)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="shard builds per layout (best kept)")
    parser.add_argument("--keep", type=Path, default=None, help="write the fixtures here and keep them")


def _frame_bytes(size: int) -> tuple[bytes, bytes]:
    """One JPEG frame and its PNG mask (a disc), shared by every frame of the fixtures."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    mask = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).astype(np.uint8) * 255
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG", quality=90)
    Image.fromarray(mask).save(png, "PNG")
    return jpeg.getvalue(), png.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_polyp_gen(root: Path, frames: int, files: tuple[bytes, bytes]) -> str:
    """``root/train/{images,masks}/seqN/frameK``, no list file; returns the split."""
    for k in range(frames):
        seq, name = f"seq{k // SEQUENCE_FRAMES}", f"frame{k % SEQUENCE_FRAMES}"
        _write(root / "train" / "images" / seq / f"{name}.jpg", files[0])
        _write(root / "train" / "masks" / seq / f"{name}.png", files[1])
    return "train"


def write_sunseg(root: Path, frames: int, files: tuple[bytes, bytes]) -> str:
    """``root/TestHardDataset/Unseen/{Frame,GT}/caseN/<official name>`` with classification.txt; returns
    the split."""
    split = root / "TestHardDataset" / "Unseen"
    lines = []
    for k in range(frames):
        case, i = f"case{k // SEQUENCE_FRAMES}", k % SEQUENCE_FRAMES
        stem = f"case_M_20181001100941_0U62{k // SEQUENCE_FRAMES:04d}_1_005_001-1_a{i % 3 + 1}_ayy_image{i + 1:04d}"
        _write(split / "Frame" / case / f"{stem}.jpg", files[0])
        _write(split / "GT" / case / f"{stem}.png", files[1])
        lines.append(f"{case}/{stem}.jpg low_grade_adenoma")
    _write(split / "Classification" / "classification.txt", ("\n".join(lines) + "\n").encode())
    return "TestHardDataset/Unseen"


def write_polypgen(root: Path, frames: int, files: tuple[bytes, bytes]) -> str:
    """PolypGen's positive sequence data, ``root/sequenceData/positive/seqN/{images_seqN/<stem>.jpg,
    masks_seqN/<stem>_mask.png}`` (PNG masks, the bytes every layout here shares; the release's are JPEG);
    returns the split."""
    for k in range(frames):
        seq, name = f"seq{k // SEQUENCE_FRAMES + 1}", f"{k // SEQUENCE_FRAMES + 1}_{k % SEQUENCE_FRAMES:04d}"
        folder = root / "sequenceData" / "positive" / seq
        _write(folder / f"images_{seq}" / f"{name}.jpg", files[0])
        _write(folder / f"masks_{seq}" / f"{name}_mask.png", files[1])
    return "sequenceData/positive"


def write_images(root: Path, frames: int, files: tuple[bytes, bytes]) -> str:
    """A flat set ``root/{images,masks}/<k>`` whose sequences.csv groups the frames into sequences;
    returns its one split."""
    rows = ["frame,sequence"]
    for k in range(frames):
        _write(root / "images" / f"{k:06d}.jpg", files[0])
        _write(root / "masks" / f"{k:06d}.png", files[1])
        rows.append(f"{k:06d},seq{k // SEQUENCE_FRAMES}")
    _write(root / "sequences.csv", ("\n".join(rows) + "\n").encode())
    return "all"


# the layouts this benchmark writes, polyp_gen first (the reference)
WRITERS: dict[Layout, Callable[[Path, int, tuple[bytes, bytes]], str]] = {
    Layout.polyp_gen: write_polyp_gen,
    Layout.sunseg: write_sunseg,
    Layout.polypgen: write_polypgen,
    Layout.images: write_images,
}


# what a measured process runs: the imports first, then the work alone timed, with the high-water mark
# of its RSS before and after (the growth is what the work took beyond the imports)
CHILD = """
import json, resource, sys, time
import torch, autosam2.data.folder, autosam2.data.video, shards.writer  # what the commands import
from autosam2.data_commands import inspect, validate
from shards.__main__ import main as shards
argv, what = json.loads(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = {"validate": validate, "inspect": inspect, "shards": shards}[what](argv)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "s": seconds, "peak_rss_mb": after / 1024, "work_rss_mb": (after - before) / 1024}))
"""


def _measure(what: str, argv: list[str]) -> dict[str, float]:
    """`validate`, `inspect` or `shards` (python -m shards) on `argv` in a process of its own: the
    seconds of the work (imports not counted), the process's peak RSS and what the work added to it (MB)."""
    import json

    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(argv), what], capture_output=True, text=True, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or json.loads(lines[-1])["code"] != 0:
        raise RuntimeError(f"{what} {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(lines[-1])
    return {k: round(figures[k], 2 if k == "s" else 1) for k in ("s", "peak_rss_mb", "work_rss_mb")}


def _empty(folder: Path) -> bool:
    return next(folder.iterdir(), None) is None


def _shard_build(root: Path, split: str, layout: Layout, out: Path) -> dict[str, float]:
    """`python -m shards build` of one split with one worker."""
    argv = ["build", str(root), "--layout", layout.value, "--split", split, "--output-dir", str(out)]
    return _measure("shards", [*argv, "--workers", "1", "--overwrite"])


def run(args: argparse.Namespace) -> dict:
    if args.keep is not None and args.keep.exists() and not (args.keep.is_dir() and _empty(args.keep)):
        raise OutputRefused(
            f"{args.keep}: --keep takes a new or empty folder (the fixtures are written there); it holds "
            f"{'a file' if not args.keep.is_dir() else 'files already'}, nothing was written"
        )
    base = Path(tempfile.mkdtemp(prefix="bench-layouts-")) if args.keep is None else args.keep
    files = _frame_bytes(args.size)
    splits = {layout: write(base / layout.value, args.frames, files) for layout, write in WRITERS.items()}
    figures: dict = {"frames": args.frames, "size": args.size, "sequence_frames": SEQUENCE_FRAMES}
    for layout, split in splits.items():
        root = str(base / layout.value)
        figures[layout.value] = {
            "validate": _measure("validate", [root, "--layout", layout.value, "--split", split]),
            "inspect": _measure("inspect", [root, "--layout", layout.value, "--split", split]),
        }
    best: dict[Layout, float] = {}
    for _ in range(args.repeats):  # in turns, so a busy moment of the machine falls on every layout
        for layout, split in splits.items():
            built = _shard_build(base / layout.value, split, layout, base / f"shards-{layout.value}")
            best[layout] = max(best.get(layout, 0.0), args.frames / built["s"])
            figures[layout.value]["shard_build_peak_rss_mb"] = built["peak_rss_mb"]
    for layout in splits:
        figures[layout.value]["shard_build_fps"] = round(best[layout], 1)
        figures[layout.value]["shard_build_vs_polyp_gen"] = round(best[layout] / best[Layout.polyp_gen], 3)
    if args.keep is None:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return figures
