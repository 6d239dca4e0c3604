"""The shard sample schema, shared by the writer (`shards/`) and the stream reader.

One sample is a chunk of consecutive frames of one sequence, keyed ``<sequence>__<chunk>``:
``f0000.jpg`` .. the original frame bytes (never re-encoded; ``.png`` when the source frame was PNG),
``m0000.png`` .. each mask as a lossless 1-bit PNG, and ``json``, the record below.

Format versions: 1, the record without labels; 2, the record may carry ``labels``, each frame's labels
from its layout (SUN-SEG's pathology class), which a version-1 reader cannot read. A shard set is
written as version 1 unless a frame of its split has labels, so sets without labels stay readable by
version-1 readers; this reader reads both (`READABLE_VERSIONS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autosam2.data.codec import decode_image, decode_mask, encode_mask_png
from autosam2.data.folder import MaskNoise, check_frame, size_problem
from autosam2.data.layouts import FrameFiles, Problem
from autosam2.data.video import POLYP_ID, Frame, Object, VideoDatapoint
from autosam2.errors import DatasetError
from autosam2.outputs import OutputKind, json_object

FORMAT = "autosam2-polyp-shards"
FORMAT_VERSION = 2  # the newest version written (with labels); see the module docstring
UNLABELLED_VERSION = 1  # what a shard set whose frames carry no labels is written as
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# the names a shard set's folder holds, finished or in the making by a job array's tasks
_SHARD_NAMES = r"manifest\.json|parts|[\w.-]+-\d{3}-\d{5}\.tar|\.part-\d{3}\.tmp-\w+|\.[\w.-]+\.tmp-\d+"


def _is_shard_set(folder: Path) -> bool:
    """A shard set (its manifest says so), or a job array's parts in the making."""
    return json_object(folder / MANIFEST).get("format") == FORMAT or (folder / "parts").is_dir()


SHARD_SET = OutputKind("a shard set", _is_shard_set, _SHARD_NAMES)
KEY_SEPARATOR = "__"


class ShardError(DatasetError):
    """A shard or sample that cannot be read; the message names the shard and the sample key."""


def sample_key(sequence: str, chunk: int) -> str:
    """``<sequence>__<chunk>``, the sequence name escaped: webdataset ends a key at its first '.' and
    reads '/' as a folder, so '%', '.' and '/' become %25, %2E and %2F (the record keeps the name)."""
    escaped = sequence.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")
    return f"{escaped}{KEY_SEPARATOR}{chunk:05d}"


def key_sequence(key: str) -> str:
    """The sequence name of a `sample_key` (the escaping undone)."""
    escaped = key.rsplit(KEY_SEPARATOR, 1)[0]
    return escaped.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def frame_member(i: int, suffix: str) -> str:
    return f"f{i:04d}{suffix.lower().replace('.jpeg', '.jpg')}"


def mask_member(i: int) -> str:
    return f"m{i:04d}.png"


@dataclass(frozen=True)
class SampleRecord:
    """The ``json`` member of a sample."""

    sequence: str
    split: str
    chunk: int
    num_chunks: int
    start: int  # index of the first frame in its sequence
    frames: list[str]  # frame names (stems), in order
    frame_members: list[str]
    mask_members: list[str]
    size: list[int]  # [H, W]
    sequence_frames: int
    labels: list[dict[str, str]] | None = None  # per frame, in order (version 2); None: no frame has any

    def to_json(self) -> bytes:
        fields = {k: v for k, v in self.__dict__.items() if k != "labels" or v is not None}
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> SampleRecord:
        try:
            fields = json.loads(data)
            return cls(**fields)
        except (ValueError, TypeError) as err:
            raise ShardError(f"{source}: bad json record ({err})") from err


def encode_sample(
    sequence: str,
    split: str,
    chunk: int,
    num_chunks: int,
    start: int,
    files: list[FrameFiles],
    size: tuple[int, int],
    sequence_frames: int,
    first_frame: str = "",
    noise: MaskNoise | None = None,
) -> dict[str, Any]:
    """Build the webdataset sample dict for one chunk; every frame passes `validate`'s checks first
    (one DatasetError naming the first problem), masks are binarised and stored as PNG; empty masks
    with compression noise are counted into `noise`. Frames' labels go into the record (`labels`)."""
    sample: dict[str, Any] = {"__key__": sample_key(sequence, chunk)}
    frame_members, mask_members = [], []
    problems: list[Problem] = []
    for i, frame in enumerate(files):
        check = check_frame(frame, keep_data=True)
        problems += check.problems
        if check.size is not None and check.size != tuple(size):
            problems.append(size_problem(frame, check.size, tuple(size), first_frame or "its first frame"))
        if problems:
            continue
        if noise is not None:
            noise.add(check.noise)
        fm, mm = frame_member(i, frame.image.suffix), mask_member(i)
        sample[fm] = check.image_bytes
        sample[mm] = encode_mask_png(torch.from_numpy(check.mask_HW))
        frame_members.append(fm)
        mask_members.append(mm)
    if problems:
        more = f" (and {len(problems) - 1} more in sequence {sequence!r})" if len(problems) > 1 else ""
        raise DatasetError(f"{problems[0]}{more}; `autosam2 validate` lists every problem")
    record = SampleRecord(
        sequence=sequence,
        split=split,
        chunk=chunk,
        num_chunks=num_chunks,
        start=start,
        frames=[f.name for f in files],
        frame_members=frame_members,
        mask_members=mask_members,
        size=list(size),
        sequence_frames=sequence_frames,
        labels=[dict(f.labels) for f in files] if any(f.labels for f in files) else None,
    )
    sample["json"] = record.to_json()
    return sample


def sample_record(sample: dict[str, Any]) -> SampleRecord:
    """The json record of a raw sample; ShardError naming the shard and key if it is missing or bad."""
    where = _where(sample)
    if "json" not in sample:
        raise ShardError(f"{where}: json record is missing")
    return SampleRecord.from_json(sample["json"], where)


def _where(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


def decode_frame(sample: dict[str, Any], record: SampleRecord, i: int) -> Frame:
    """Frame `i` of a raw sample (its image uint8 ``[3,H,W]`` and polyp mask); ShardError naming the
    shard, the key and the member when it is missing, undecodable or of the wrong size."""
    where = _where(sample)
    fm, mm = record.frame_members[i], record.mask_members[i]
    for member in (fm, mm):
        if member not in sample:
            raise ShardError(f"{where}: member {member} is missing")
    try:
        image = decode_image(sample[fm], fm)
        mask = decode_mask(sample[mm], mm)
    except DatasetError as err:
        raise ShardError(f"{where}: {err}") from err
    if tuple(image.shape[-2:]) != tuple(record.size) or tuple(mask.shape) != tuple(record.size):
        raise ShardError(f"{where}: frame {fm} or mask {mm} is not {record.size[1]}x{record.size[0]} (WxH)")
    index = record.start + i
    return Frame(index, image, [Object(POLYP_ID, index, mask)], name=record.frames[i])


def sample_metadata(sample: dict[str, Any], record: SampleRecord) -> dict[str, Any]:
    return {
        "split": record.split,
        "chunk": record.chunk,
        "num_chunks": record.num_chunks,
        "start": record.start,
        "sequence_frames": record.sequence_frames,
        "key": sample.get("__key__"),
        "url": sample.get("__url__"),
    }


def decode_sample(sample: dict[str, Any], frames: slice | None = None) -> VideoDatapoint:
    """Raw webdataset sample (member bytes) -> VideoDatapoint with uint8 images; only `frames` are decoded."""
    record = sample_record(sample)
    decoded = [decode_frame(sample, record, i) for i in range(len(record.frames))[frames or slice(None)]]
    size = (record.size[0], record.size[1])
    return VideoDatapoint(record.sequence, decoded, size, sample_metadata(sample, record))


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ShardError(
            f"{path}: manifest is missing (is {shard_dir} a shard set built by `python -m shards build`?)"
        ) from err
    except ValueError as err:
        raise ShardError(f"{path}: manifest is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a shard set's manifest (a JSON {type(manifest).__name__})")
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        versions = " or ".join(str(v) for v in READABLE_VERSIONS)
        raise ShardError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"this reader needs {FORMAT!r} version {versions}"
        )
    check_shard_entries(manifest.get("shards"), path)
    if not isinstance(manifest.get("totals", {}), dict):
        raise ShardError(f"{path}: its totals are not an object")
    return manifest


# what every shard entry of a manifest or part record holds, by type
SHARD_ENTRY = {"name": str, "samples": list, "frames": int, "bytes": int, "sha256": str, "sequences": dict}


def check_shard_entries(entries: Any, source: Path) -> None:
    """One ShardError naming `source` when its shard list is not a list of well-formed entries."""
    if not isinstance(entries, list):
        raise ShardError(f"{source}: its shard list is not a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), t) for k, t in SHARD_ENTRY.items()
        ):
            wanted = ", ".join(f"{k} ({t.__name__})" for k, t in SHARD_ENTRY.items())
            raise ShardError(f"{source}: shard entry {i} does not hold {wanted}")
