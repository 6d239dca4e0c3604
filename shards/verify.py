"""Verify a shard set against its manifest: checksums, counts, every member decodes, masks are binary."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from autosam2.data.codec import decode_image, mask_values
from autosam2.data.sample_format import SampleRecord, ShardError, read_manifest
from autosam2.errors import DatasetError


def _members(path: Path) -> tuple[dict[str, dict[str, bytes]], list[str], str | None]:
    """Members grouped by sample key, keys in tar order, and the read error if the tar breaks off."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, suffix = base_plus_ext(info.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][suffix] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        return samples, order, f"tar is truncated or corrupt ({err})"
    return samples, order, None


def _check_sample(shard: str, key: str, members: dict[str, bytes]) -> tuple[list[str], int]:
    """Problems of one sample, and its frame count by its record."""
    where = f"{shard}: sample {key}"
    if "json" not in members:
        return [f"{where}: json record is missing"], 0
    try:
        record = SampleRecord.from_json(members["json"], where)
    except ShardError as err:
        return [str(err)], 0
    problems = []
    expected = {"json", *record.frame_members, *record.mask_members}
    for extra in sorted(set(members) - expected):
        problems.append(f"{where}: member {extra} is not in its json record")
    for frame_member, mask_member in zip(record.frame_members, record.mask_members, strict=True):
        if frame_member not in members:
            problems.append(f"{where}: member {frame_member} is missing")
        else:
            try:
                image = decode_image(members[frame_member], frame_member)
                if list(image.shape[-2:]) != record.size:
                    problems.append(
                        f"{where}: {frame_member} is {image.shape[2]}x{image.shape[1]}, the record says {record.size[1]}x{record.size[0]}"
                    )
            except DatasetError as err:
                problems.append(f"{where}: {err}")
        if mask_member not in members:
            problems.append(f"{where}: member {mask_member} is missing")
            continue
        try:
            values = mask_values(members[mask_member], mask_member)
        except DatasetError as err:
            problems.append(f"{where}: {err}")
            continue
        if not np.isin(values, (0, 255)).all():
            problems.append(f"{where}: {mask_member} is not binary (values other than 0 and 255)")
        if list(values.shape) != record.size:
            problems.append(
                f"{where}: {mask_member} is {values.shape[1]}x{values.shape[0]}, the record says {record.size[1]}x{record.size[0]}"
            )
    return problems, len(record.frames)


def verify(shard_dir: str | Path, progress: bool = False) -> list[str]:
    """Every problem of a shard set, one line each naming the shard (and sample); empty when sound."""
    shard_dir = Path(shard_dir)
    try:
        manifest = read_manifest(shard_dir)
    except ShardError as err:
        return [str(err)]
    problems: list[str] = []
    listed = {s["name"] for s in manifest["shards"]}
    for stray in sorted(p.name for p in shard_dir.glob("*.tar")):
        if stray not in listed:
            problems.append(f"{shard_dir / stray}: shard is not in the manifest")
    shards: Iterable = manifest["shards"]
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    frames = samples = 0
    for entry in shards:
        path = shard_dir / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: shard is missing")
            continue
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            problems.append(f"{path}: {len(data)} bytes, the manifest says {entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        members, order, broken = _members(path)
        if broken:
            last = f" after sample {order[-1]}" if order else ""
            problems.append(f"{path}: {broken}{last}")
        if order != entry["samples"]:
            missing = [k for k in entry["samples"] if k not in members]
            extra = [k for k in order if k not in entry["samples"]]
            problems.append(
                f"{path}: holds {len(order)} samples, the manifest lists {len(entry['samples'])} (missing {missing[:5]}, unlisted {extra[:5]})"
            )
        for key in order:
            sample_problems, sample_frames = _check_sample(str(path), key, members[key])
            problems += sample_problems
            frames += sample_frames
        samples += len(order)
    totals = manifest.get("totals", {})
    if not problems and (samples != totals.get("samples") or frames != totals.get("frames")):
        problems.append(
            f"{shard_dir}: {samples} samples / {frames} frames read, the manifest totals say {totals.get('samples')} / {totals.get('frames')}"
        )
    return problems
