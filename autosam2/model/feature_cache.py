"""The frozen image encoder's output kept per frame, so a frame trained on again costs no encoder pass.

With the image encoder frozen and frames that reach it unchanged (no augmentation but flips), a frame's
encoder output is the same every time the frame comes back; on the CPU demo (hiera-t, 256 px, one
thread per rank) that pass is about 78% of a frame-mode training step. The cache keys each frame by
(video, frame index, horizontal flip, vertical flip), computes a frame it does not hold on its own (a
batch of one, so the stored value does not depend on which frames shared the step: a resumed run, whose
cache starts empty, feeds the model the same numbers as the uninterrupted one), and keeps it in this
process's host memory up to `budget_bytes`; frames beyond the budget go to the disk tier (`DiskTier`,
up to its own budget) where there is one, and beyond both are computed every time. An entry stays where it
was put (memory is filled first, then disk; nothing moves or is evicted), so each frame's place does not
depend on the order of later hits. `dtype=torch.bfloat16` stores each level in bf16 (half the bytes) and
hands it back in the encoder's dtype; a frame just encoded goes through the same rounding, so a frame's
numbers do not depend on whether it was a hit. The default stores what the encoder gives, bit for bit.

With `share` (under DDP: an all-gather of objects), the frames any rank encoded in a step go to every
rank's cache, so each frame is encoded once in the whole job rather than once per rank (ranks hold the
same frozen weights, so an entry is the same whichever rank made it). The cache lives as long as the process: a new run, a resume, another image size or
encoder starts it empty, so it cannot serve features of another encoder.

Shape legend: N images (time-major T*B), C channels, h x w a feature level's grid.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosam2.config import ConfigError, DataConfig, FeatureCacheDtype
from autosam2.data.video import ClipBatch

FrameKey = tuple[str, int, bool, bool]


def frame_keys(batch: ClipBatch) -> list[FrameKey]:
    """One key per image of the batch, time-major like ``images_TBCHW.flatten(0, 1)``."""
    t_len, b = batch.frame_indices_TB.shape
    flips = [(False, False)] * b
    if batch.augment is not None:
        flips = [(bool(p.hflip), bool(p.vflip)) for p in batch.augment]
    indices = batch.frame_indices_TB.tolist()
    return [(batch.video_ids[j], int(indices[t][j]), *flips[j]) for t in range(t_len) for j in range(b)]


class FeatureCache:
    """`encode(images, keys)`: the image encoder's output dict for the images, from memory or disk where held."""

    def __init__(
        self,
        encoder: nn.Module,
        budget_bytes: int,
        autocast: bool = False,
        share: Callable[[Any], list[Any]] | None = None,
        dtype: torch.dtype = torch.float32,
        disk: DiskTier | None = None,
    ):
        self.encoder = encoder
        self.budget_bytes = budget_bytes
        self.autocast = autocast
        self.share = share  # every rank's object, on every rank (a collective: each step calls it once)
        self.narrow = dtype if dtype != torch.float32 else None  # the storage dtype, None: as encoded
        self.disk = disk
        self.entries: dict[Hashable, list[torch.Tensor]] = {}  # per frame: backbone_fpn levels [C,h,w]
        self.pos: list[torch.Tensor] | None = None  # the position encodings: the same for every frame
        # each level's memory layout as the encoder returns it (Hiera's lower levels are channels-last):
        # handed on in that layout, the decoder's convolutions run the encoder's own kernels, bit for bit
        self.layouts: list[torch.memory_format] = []
        self.dtypes: list[torch.dtype] = []  # each level's dtype as the encoder returns it
        self.bytes = 0  # held in memory
        self.frame_bytes = 0  # one frame's stored levels
        self.hits = self.disk_hits = self.misses = 0

    def _compute(self, image_CHW: torch.Tensor) -> list[torch.Tensor]:
        with (
            torch.no_grad(),
            torch.autocast(image_CHW.device.type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            out = self.encoder(image_CHW[None])
        if self.pos is None:
            self.pos = [p.detach() for p in out["vision_pos_enc"]]
            self.layouts = [_layout(level) for level in out["backbone_fpn"]]
            self.dtypes = [level.dtype for level in out["backbone_fpn"]]
        return [level[0].detach() for level in out["backbone_fpn"]]

    def _stored(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """A frame's levels as the cache keeps them: in host memory, in the storage dtype."""
        return [t.to("cpu", self.narrow or t.dtype) for t in levels]

    def _held(self, key: Hashable, fresh: dict[Hashable, list[torch.Tensor]]) -> list[torch.Tensor] | None:
        held = self.entries.get(key, fresh.get(key))
        if held is None and self.disk is not None:
            held = self.disk.get(key)
            self.disk_hits += held is not None
        return held

    def encode(self, images_NCHW: torch.Tensor, keys: Sequence[Hashable]) -> dict[str, Any]:
        if len(keys) != images_NCHW.shape[0]:
            raise ValueError(f"{len(keys)} frame keys for {images_NCHW.shape[0]} images")
        levels, fresh = [], {}
        for image, key in zip(images_NCHW, keys, strict=True):
            held = self._held(key, fresh)
            if held is not None:
                self.hits += 1
                levels.append(self._handed_back(held, image.device))
                continue
            self.misses += 1
            computed = self._compute(image)
            fresh[key] = self._stored(computed)
            levels.append(computed if self.narrow is None else self._handed_back(fresh[key], image.device))
        # the frames every rank encoded this step, kept by all: each frame is encoded once, by one rank
        for new in self.share(fresh) if self.share is not None else [fresh]:
            for key, value in new.items():
                self._keep(key, value)
        fpn = [
            torch.stack(level).contiguous(memory_format=layout)
            for level, layout in zip(zip(*levels, strict=True), self.layouts, strict=True)
        ]
        pos = [p.to(images_NCHW.device).expand(len(keys), -1, -1, -1) for p in self.pos]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}

    def _handed_back(self, held: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return [t.to(device, dtype, non_blocking=True) for t, dtype in zip(held, self.dtypes, strict=True)]

    def _keep(self, key: Hashable, levels: list[torch.Tensor]) -> None:
        """Into memory while the budget allows, else onto disk while its budget allows."""
        if key in self.entries or (self.disk is not None and key in self.disk):
            return
        size = sum(t.numel() * t.element_size() for t in levels)
        self.frame_bytes = size
        if self.bytes + size <= self.budget_bytes:
            self.entries[key] = levels
            self.bytes += size
        elif self.disk is not None:
            self.disk.put(key, levels)

    def take_stats(self) -> dict[str, float]:
        """Hit rates since the last call (all hits, and those read from disk), the bytes held and one
        frame's stored bytes, for the log; the counts start again."""
        looked = self.hits + self.misses
        stats = {
            "train/feature_cache_hit_rate": self.hits / looked if looked else 0.0,
            "train/feature_cache_gb": self.bytes / 1e9,
            "train/feature_cache_bytes_per_frame": float(self.frame_bytes),
        }
        if self.disk is not None:
            stats["train/feature_cache_disk_hit_rate"] = self.disk_hits / looked if looked else 0.0
            stats["train/feature_cache_disk_gb"] = self.disk.bytes / 1e9
        self.hits = self.disk_hits = self.misses = 0
        return stats

    def close(self) -> None:
        """Remove the disk tier's files (the memory goes with the process)."""
        if self.disk is not None:
            self.disk.close()


def feature_cache(
    encoder: nn.Module,
    data: DataConfig,
    autocast: bool,
    share: Callable[[Any], list[Any]] | None,
    run: tuple[Path, int],
) -> FeatureCache:
    """The cache `data.feature_cache*` describe, for a run (its output folder) and rank (`run`); a
    disk tier under `data.feature_cache_dir` is checked here (one ConfigError line) and made at its
    first frame."""
    disk = None
    if data.feature_cache_dir is not None:
        disk = DiskTier(
            Path(data.feature_cache_dir), folder_name(*run), int(data.feature_cache_disk_gb * 1e9)
        )
    dtype = torch.bfloat16 if data.feature_cache_dtype == FeatureCacheDtype.bf16 else torch.float32
    return FeatureCache(encoder, int(data.feature_cache_gb * 1e9), autocast, share, dtype, disk)


MARK = "AUTOSAM2_FEATURE_CACHE"  # the file that makes a folder under data.feature_cache_dir ours


def folder_name(output_dir: Path, rank: int) -> str:
    """The disk tier's folder for a run (its output folder) and rank: ranks never share one, and a run
    started again (a resume, a restart after a crash) finds its own folder and replaces what is in it."""
    run = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]
    return f"autosam2-feature-cache-{run}-rank{rank}"


class DiskTier:
    """Frames beyond the memory budget, one file per frame in a folder of this run and rank under `root`,
    read back memory-mapped (`torch.load(mmap=True)`: the OS pages a frame in as it is copied to the
    device, and the page cache, not this process, holds what is read). A file is written under a
    temporary name and renamed, so a frame file is whole or absent. The folder is made, marked as ours
    (`MARK`), at the first frame written (a disk that fails a write, full say, takes no more frames);
    stale frame files in a marked folder are ours and are removed
    then; a folder of that name without the mark is the user's and is never touched. `close()` removes
    the frame files, the mark and the folder (if nothing else is in it)."""

    def __init__(self, root: Path, name: str, budget_bytes: int):
        self.root, self.folder = Path(root), Path(root) / name
        self.budget_bytes = budget_bytes
        self.files: dict[Hashable, Path] = {}
        self.bytes = 0
        self.full = False  # a frame did not fit: frames are the same size, so none will
        self.claimed = False
        _check_root(self.root, self.folder)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.files

    def get(self, key: Hashable) -> list[torch.Tensor] | None:
        path = self.files.get(key)
        return None if path is None else torch.load(path, mmap=True, weights_only=True)

    def put(self, key: Hashable, levels: list[torch.Tensor]) -> None:
        if self.full:
            return
        if not self.claimed:
            self._claim()
        path = self.folder / f"{len(self.files)}.pt"
        part = path.with_suffix(".part")
        try:
            torch.save(levels, part)  # each level with its strides (Hiera's lower levels are channels-last)
        except OSError as err:  # a full or failing disk: a cache, so the run goes on encoding
            part.unlink(missing_ok=True)
            self.full = True
            print(
                f"feature cache: {part}: {err.strerror or err}; frames beyond the memory budget are "
                "encoded every time from now on",
                file=sys.stderr,
                flush=True,
            )
            return
        size = part.stat().st_size
        if self.bytes + size > self.budget_bytes:
            part.unlink()
            self.full = True
            return
        os.replace(part, path)
        self.files[key] = path
        self.bytes += size

    def _claim(self) -> None:
        _check_root(self.root, self.folder)
        self.folder.mkdir(exist_ok=True)
        (self.folder / MARK).write_text("autosam2 feature cache: removed at the end of its run\n")
        self._remove_frames()
        self.claimed = True

    def _remove_frames(self) -> None:
        for path in self.folder.iterdir():
            if path.suffix in (".pt", ".part") and path.stem.isdigit() and path.is_file():
                path.unlink()

    def close(self) -> None:
        if not self.claimed:
            return
        self._remove_frames()
        (self.folder / MARK).unlink(missing_ok=True)
        if not any(self.folder.iterdir()):
            self.folder.rmdir()
        self.files, self.bytes, self.claimed = {}, 0, False


def _check_root(root: Path, folder: Path) -> None:
    """One ConfigError line where the disk tier cannot work: `root` a file, not makeable or not
    writable, or our folder's name taken by something that is not ours."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        what = "a link to nothing" if root.is_symlink() and not root.exists() else "a file"
        raise ConfigError(f"data.feature_cache_dir {root} is {what}, not a folder") from None
    except OSError as err:
        raise ConfigError(f"data.feature_cache_dir {root} cannot be made: {err.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"data.feature_cache_dir {root} is not writable")
    if folder.is_symlink():  # what it leads to is not ours to empty, whatever it holds
        why = "is a link, not a feature cache folder of ours"
    elif folder.exists() and not (folder / MARK).is_file():
        why = f"exists and is not a feature cache folder of ours (no {MARK} file in it)"
    else:
        return
    raise ConfigError(
        f"data.feature_cache_dir: {folder} {why}; it is left as it is: move it or name another "
        "data.feature_cache_dir"
    )


def _layout(t: torch.Tensor) -> torch.memory_format:
    channels_last = (
        t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    )
    return torch.channels_last if channels_last else torch.contiguous_format
