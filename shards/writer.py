"""Build WebDataset tar shards from one split of a dataset folder in any layout (`autosam2.data.layouts`):
plan, write (in parallel, to temp names), merge. The manifest names the layout and the split; shard
files are named after the split with any character outside ``[A-Za-z0-9_.-]`` as '-'
(``TestHardDataset/Unseen`` -> ``TestHardDataset-Unseen-000-00000.tar``).

A sequence never spans two shards, so evaluation ranks that split by shard read whole sequences. A
shard is closed before the next sequence would take it past ``max_shard_mb`` (a longer sequence gets a
shard of its own). Job arrays write disjoint parts (``part_index`` of ``num_parts``), each recorded in
``parts/part-III-of-NNN.json``; ``merge`` joins the parts into the single ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import webdataset as wds

import autosam2
from autosam2.atomic import atomic_file, atomic_write_json, make_folders, name_output, remove_empty
from autosam2.config import Layout
from autosam2.data.codec import image_size
from autosam2.data.folder import MaskNoise
from autosam2.data.layouts import SequenceFiles, reader, scan, split_name
from autosam2.data.sample_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_SET,
    UNLABELLED_VERSION,
    check_shard_entries,
    encode_sample,
)
from autosam2.errors import DatasetError, OutputRefused
from autosam2.outputs import claim, claim_shared, output_directory

PARTS_DIR = "parts"
TAR_OVERHEAD = 1536  # bytes per member: header + padding, for the size estimate


@dataclass(frozen=True)
class ShardJob:
    name: str
    split: str
    sequences: tuple[SequenceFiles, ...]
    frames_per_sample: int


def _sequence_bytes(seq: SequenceFiles) -> int:
    return sum(
        f.image.stat().st_size + (f.mask.stat().st_size // 4 if f.mask else 0) + 3 * TAR_OVERHEAD
        for f in seq.frames
    )


def shard_prefix(split: str) -> str:
    """A split's name as the start of its shard files' names: one path component, no '/'."""
    return re.sub(r"[^\w.-]", "-", split)


def format_version(sequences: list[SequenceFiles]) -> int:
    """The format version these sequences are written in: the newest when a frame has labels."""
    labelled = any(frame.labels for seq in sequences for frame in seq.frames)
    return FORMAT_VERSION if labelled else UNLABELLED_VERSION


def assign_parts(sequences: list[SequenceFiles], num_parts: int) -> list[list[SequenceFiles]]:
    """Balance sequences over parts by bytes (largest first to the lightest part); keep list order inside."""
    load = [0] * num_parts
    owner: dict[str, int] = {}
    for seq in sorted(sequences, key=lambda s: -_sequence_bytes(s)):
        part = min(range(num_parts), key=lambda p: (load[p], p))
        owner[seq.name] = part
        load[part] += _sequence_bytes(seq)
    return [[s for s in sequences if owner[s.name] == p] for p in range(num_parts)]


def plan_shards(
    sequences: list[SequenceFiles], split: str, part: int, frames_per_sample: int, max_bytes: int
) -> list[ShardJob]:
    groups: list[list[SequenceFiles]] = []
    size = 0
    for seq in sequences:
        seq_bytes = _sequence_bytes(seq)
        if not groups or (groups[-1] and size + seq_bytes > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(seq)
        size += seq_bytes
    return [
        ShardJob(f"{shard_prefix(split)}-{part:03d}-{i:05d}.tar", split, tuple(g), frames_per_sample)
        for i, g in enumerate(groups)
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(job: ShardJob, folder: Path) -> dict[str, Any]:
    """Write one shard to a temp name in `folder`, rename it, and return its manifest entry."""
    final = folder / job.name
    samples: list[str] = []
    frames = 0
    sequences = {}
    noise = MaskNoise()
    with atomic_file(final) as stream, wds.TarWriter(stream, encoder=False) as writer:
        for seq in job.sequences:
            n = len(seq.frames)
            chunks = math.ceil(n / job.frames_per_sample)
            size = image_size(seq.frames[0].image)
            for chunk in range(chunks):
                start = chunk * job.frames_per_sample
                files = list(seq.frames[start : start + job.frames_per_sample])
                sample = encode_sample(
                    seq.name, job.split, chunk, chunks, start, files, size, n, seq.frames[0].image.name, noise
                )
                writer.write(sample)
                samples.append(sample["__key__"])
                frames += len(files)
            sequences[seq.name] = {"frames": n, "samples": chunks, "size": list(size)}
    return {
        "name": job.name,
        "samples": samples,
        "sequences": sequences,
        "frames": frames,
        "bytes": final.stat().st_size,
        "sha256": _sha256(final),
        "empty_with_noise": asdict(noise),
    }


def mask_noise(shards: list[dict[str, Any]]) -> MaskNoise:
    """The source masks of these manifest shard entries that were empty with compression noise."""
    noise = MaskNoise()
    for shard in shards:
        noise.merge(MaskNoise(**shard.get("empty_with_noise", {})))
    return noise


def _part_path(out: Path, index: int, count: int) -> Path:
    return out / PARTS_DIR / f"part-{index:03d}-of-{count:03d}.json"


def build_part(
    root: str | Path,
    split: str,
    out: str | Path,
    part_index: int = 0,
    num_parts: int = 1,
    frames_per_sample: int = 16,
    max_shard_mb: float = 1024.0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    layout: Layout | str = Layout.auto,
    sequences: list[SequenceFiles] | None = None,
) -> dict[str, Any]:
    """Write one disjoint part of the shard set of `split` (a split of `root`'s layout) into `out` and
    record it; return the part record. `sequences`: the split as `scan_root` read it (None: read here)."""
    root, out = Path(os.path.realpath(root)), Path(out)
    if frames_per_sample < 1 or max_shard_mb <= 0 or not 0 <= part_index < num_parts:
        raise DatasetError(
            f"need frames_per_sample >= 1, max_shard_mb > 0, 0 <= shard index < num shards; got {frames_per_sample}, {max_shard_mb}, {part_index}/{num_parts}"
        )
    claim_shared(out, SHARD_SET, inputs=[root])
    layout = reader(root, layout).layout
    sequences = scan_root(root, split, layout) if sequences is None else sequences
    split = split_name(root, layout, split, "train")  # None: the one scan_root read
    part_file = _part_path(out, part_index, num_parts)
    _clear_part(out, part_file, num_parts, overwrite)
    mine = assign_parts(sequences, num_parts)[part_index]
    jobs = plan_shards(mine, split, part_index, frames_per_sample, int(max_shard_mb * 1e6))
    made = make_folders(out / PARTS_DIR)
    moved: list[Path] = []
    try:
        label = f"shards {split} part {part_index}/{num_parts}" if progress else None
        entries = _write_shards(jobs, out, part_index, workers, label, moved)
        source = {"root": str(root), "layout": str(layout), "split": split}
        record = _part_record(
            source, split, part_index, num_parts, frames_per_sample, max_shard_mb, sequences
        )
        record["shards"] = entries
        atomic_write_json(part_file, record)
    except BaseException as err:  # this task's shards and the folders it made go; other tasks' stay
        for path in moved:
            path.unlink(missing_ok=True)
        remove_empty(made)
        if isinstance(err, OSError):
            name_output(err, None, out)
        raise
    return record


def _clear_part(out: Path, part_file: Path, num_parts: int, overwrite: bool) -> None:
    """Refuse a built set, another job array's parts or this part written before (without
    `overwrite`); with it, this part's earlier shards go."""
    if (out / MANIFEST).exists() and not overwrite:
        raise OutputRefused(f"{out / MANIFEST}: shard set already built; pass --overwrite to rebuild")
    other = (
        sorted(
            p.name
            for p in (out / PARTS_DIR).glob("part-*-of-*.json")
            if not p.name.endswith(f"-of-{num_parts:03d}.json")
        )
        if (out / PARTS_DIR).is_dir()
        else []
    )
    if other and not overwrite:
        raise OutputRefused(
            f"{out / PARTS_DIR}: holds {other[0]}, a part of another job array; pass --overwrite to rebuild, or choose another output path"
        )
    if part_file.exists():
        if not overwrite:
            raise OutputRefused(f"{part_file}: part already written; pass --overwrite to rewrite it")
        for shard in _read_record(part_file)["shards"]:
            (out / shard["name"]).unlink(missing_ok=True)


def _part_record(
    source: dict[str, str],
    split: str,
    part_index: int,
    num_parts: int,
    frames_per_sample: int,
    max_shard_mb: float,
    sequences: list[SequenceFiles],
) -> dict[str, Any]:
    """What a part record says of its job array and its source (root, layout, split, and the split's
    counts), before its shards are added."""
    return {
        "format": FORMAT,
        "format_version": format_version(sequences),
        "split": split,
        "part": part_index,
        "num_parts": num_parts,
        "frames_per_sample": frames_per_sample,
        "max_shard_mb": max_shard_mb,
        "source": {
            **source,
            "sequences": len(sequences),
            "frames": sum(len(s.frames) for s in sequences),
        },
    }


def _write_shards(
    jobs: list[ShardJob], out: Path, part_index: int, workers: int, label: str | None, moved: list[Path]
) -> list[dict[str, Any]]:
    """Write the shards in a staging folder inside `out`, then move them in (each moved path appended to
    `moved`); return their manifest entries. `label`: a progress bar's."""
    staging = Path(tempfile.mkdtemp(prefix=f".part-{part_index:03d}.tmp-", dir=out))
    try:
        bar = None
        if label:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(s.frames) for j in jobs for s in j.sequences), desc=label, unit="frame")
        entries: list[dict[str, Any]] = []
        with (
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork"))
            if workers > 1 and len(jobs) > 1
            else nullcontext()
        ) as pool:
            written = (
                pool.map(write_shard, jobs, [staging] * len(jobs))
                if pool
                else map(write_shard, jobs, [staging] * len(jobs))
            )
            for entry in written:
                entries.append(entry)
                if bar:
                    bar.update(entry["frames"])
        if bar:
            bar.close()
        for entry in entries:
            os.replace(staging / entry["name"], out / entry["name"])
            moved.append(out / entry["name"])
        return entries
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge(out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Join every part record of `out` into `out/manifest.json`; all parts must be there and agree."""
    out = Path(out)
    if not out.is_dir():
        raise DatasetError(f"{out}: no such shard folder to merge")
    files = sorted((out / PARTS_DIR).glob("part-*-of-*.json"))
    if not files:
        raise DatasetError(f"{out / PARTS_DIR}: no part records to merge")
    parts = [_read_record(f) for f in files]
    counts = {p["num_parts"] for p in parts}
    if len(counts) != 1:
        raise DatasetError(f"{out / PARTS_DIR}: parts of different job arrays ({sorted(counts)} parts)")
    count = counts.pop()
    missing = sorted(set(range(count)) - {p["part"] for p in parts})
    if missing:
        raise DatasetError(
            f"{out / PARTS_DIR}: parts {missing} of {count} are missing; rerun those array tasks"
        )
    same = ("split", "frames_per_sample", "source", "format_version")
    for p, f in zip(parts, files, strict=True):
        for key in same:
            if p[key] != parts[0][key]:
                raise DatasetError(f"{f}: {key} {p[key]!r} differs from part 0's {parts[0][key]!r}")
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["name"])
    for shard in shards:
        path = out / shard["name"]
        if not path.is_file():
            raise DatasetError(f"{path}: listed by a part record but missing")
        if path.stat().st_size != shard["bytes"]:
            raise DatasetError(
                f"{path}: {path.stat().st_size} bytes, its part record says {shard['bytes']}; rerun that array task"
            )
    sequences = {name: info for s in shards for name, info in s["sequences"].items()}
    manifest = {
        "format": FORMAT,
        "format_version": parts[0]["format_version"],
        "created_by": f"autosam2 {autosam2.__version__}",
        "layout": parts[0]["source"].get("layout", str(Layout.polyp_gen)),
        "split": parts[0]["split"],
        "frames_per_sample": parts[0]["frames_per_sample"],
        "source": parts[0]["source"],
        "shards": shards,
        "sequences": sequences,
        "totals": {
            "shards": len(shards),
            "samples": sum(len(s["samples"]) for s in shards),
            "frames": sum(s["frames"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "sequences": len(sequences),
        },
    }
    if (out / MANIFEST).exists() and not overwrite:
        raise OutputRefused(f"{out / MANIFEST}: shard set already merged; pass --overwrite to merge again")
    atomic_write_json(out / MANIFEST, manifest)
    for f in files:  # only the records merged: anything else in parts/ is not ours to remove
        f.unlink()
    _remove_empty_folder(out / PARTS_DIR)
    return manifest


def build(
    root: str | Path,
    split: str,
    out: str | Path,
    frames_per_sample: int = 16,
    max_shard_mb: float = 1024.0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    layout: Layout | str = Layout.auto,
) -> dict[str, Any]:
    """Build a whole shard set in a temp folder beside `out`, then rename it into place: `out` must be
    missing, an empty folder, or (with `overwrite`) a shard set, and apart from `root`; the dataset is
    checked before anything is written."""
    root = Path(os.path.realpath(root))  # a symlink loop: said missing, not raised
    claim(out, SHARD_SET, overwrite, inputs=[root])
    sequences = scan_root(root, split, layout)
    split = split_name(root, layout, split, "train")  # None: the one scan_root read
    with output_directory(out, SHARD_SET, overwrite, inputs=[root]) as tmp:
        build_part(
            root,
            split,
            tmp,
            0,
            1,
            frames_per_sample,
            max_shard_mb,
            workers,
            progress=progress,
            layout=layout,
            sequences=sequences,
        )
        return merge(tmp)


def scan_root(root: str | Path, split: str, layout: Layout | str = Layout.auto) -> list[SequenceFiles]:
    """The split's sequences; one DatasetError when `root` is in no layout (or not in `layout`), has no
    split `split` (listing those it has), or naming the first problem when its structure is broken."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist")
    layout = reader(root, layout).layout
    split = split_name(root, layout, split, "train")
    sequences, problems = scan(root, split, layout)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatasetError(
            f"{problems[0]}{more}; run `autosam2 validate {root} --layout {layout} --split {split}` to list them all"
        )
    return sequences


def _read_record(path: Path) -> dict[str, Any]:
    """A part record; one DatasetError naming it when it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise DatasetError(f"{path}: unreadable part record ({err})") from err
    keys = {"part": int, "num_parts": int, "split": str, "frames_per_sample": int, "format_version": int}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in keys.items()):
        wanted = ", ".join(f"{k} ({t.__name__})" for k, t in keys.items())
        raise DatasetError(f"{path}: not a part record of a shard set (it needs {wanted})")
    if "source" not in record:
        raise DatasetError(f"{path}: not a part record of a shard set (it names no source)")
    check_shard_entries(record.get("shards"), path)
    return record


def _remove_empty_folder(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # it holds something else: left as it is
