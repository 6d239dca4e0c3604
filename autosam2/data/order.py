"""The global training order of a shard set: which sample comes at each position of an epoch, the same
for any number of ranks and loader workers, and where each one lies in its tar.

Epoch e's order (seeded by (seed, e)): the shards in a seeded permutation, cut into windows of
`window` shards; inside each window the samples of its shards in a seeded permutation of their own. A
position p of the epoch is thus a (shard, sample) pair, computed without reading any data. Only the
samples that can hold a clip (at least `clip_len` frames, from the manifest) take part; an epoch longer
than the set (`batches_per_epoch`) goes on with further passes, each a fresh permutation.

Global steps take `G` = ranks x clips per rank consecutive positions: step j of the epoch is positions
[jG, jG + G), rank r's clips [jG + rB, jG + rB + B); the loader worker that serves a rank's batch is
DataLoader's round robin, so the batches a rank receives do not depend on its worker count. The last
positions of an epoch that do not fill a whole step are dropped (`dropped`), so every rank has the same
number of batches. Resuming at (epoch, position) is computing from there: nothing before is read.

A mix of shard sets (`MixOrder`) takes each global step whole from one set, since a batch stacks clips
of one length: step j of epoch e comes from the set a weighted draw seeded by (seed, e) picks at j, the
same on every rank; each set goes on along its own global order, at the positions its earlier steps of
the epoch left it at (further passes when it runs out). Epoch positions count whole steps of the mix.

`TarIndex` finds a sample's members by their offsets in the tar (read from the tar headers once per
shard, skipping over the data), so a loader worker reads only its own samples and skips others without
reading, let alone decoding, them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from webdataset.tariterators import base_plus_ext

from autosam2.data.sample_format import KEY_SEPARATOR, ShardError, key_sequence

_ORDER = 0x0D  # keeps the order's seeds apart from the clips' (`clip_seed`) and the mix's draws
_CLIP = 0x0C
_MIX = 0x0E
_SOURCE = 0x0F
_COND = 0x10


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def clip_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the clip at `position` of `epoch`: its window of frames and its augmentation."""
    return _seed(seed, epoch, position, _CLIP)


def cond_mask_draw(seed: int, epoch: int, batch: int, rank: int) -> float:
    """A uniform number in [0, 1) for rank `rank`'s batch `batch` of `epoch`: below train.cond_mask_prob,
    its clips take frame 0's ground truth as frame 0's output (the same draw on resume)."""
    return float(np.random.default_rng(_seed(seed, epoch, batch, rank, _COND)).random())


def source_seed(seed: int, source: int) -> int:
    """The seed of source `source` of a mix: its own global order, clip windows and augmentations."""
    return _seed(seed, source, _SOURCE)


def longest_sample(manifest: dict[str, Any]) -> int:
    """The most frames any sample of the manifest holds."""
    per_sample = int(manifest["frames_per_sample"])
    return max((min(int(s["frames"]), per_sample) for s in manifest["sequences"].values()), default=0)


def usable_samples(manifest: dict[str, Any], clip_len: int) -> list[list[int]]:
    """Per shard of the manifest, the indices of its samples that hold at least `clip_len` frames."""
    per_sample = int(manifest["frames_per_sample"])
    sequences = manifest["sequences"]
    usable = []
    for shard in manifest["shards"]:
        keep = []
        for i, key in enumerate(shard["samples"]):
            frames = sequences.get(key_sequence(key), {}).get("frames", 0)
            chunk = int(key.rsplit(KEY_SEPARATOR, 1)[1])
            if min(per_sample, frames - chunk * per_sample) >= clip_len:
                keep.append(i)
        usable.append(keep)
    return usable


@dataclass(frozen=True)
class Step:
    """A global step: its epoch and the epoch position of its first sample."""

    epoch: int
    position: int


class GlobalOrder:
    def __init__(self, manifest: dict[str, Any], clip_len: int, seed: int, window: int):
        self.seed, self.window = seed, max(1, window)
        self.usable = usable_samples(manifest, clip_len)
        self.total = sum(len(u) for u in self.usable)
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    def epoch_length(self, global_batch: int, batches_per_epoch: int | None = None) -> int:
        """Positions in an epoch: the set once, or `batches_per_epoch` steps of `global_batch`."""
        return batches_per_epoch * global_batch if batches_per_epoch else self.total

    def steps_per_epoch(self, global_batch: int, batches_per_epoch: int | None = None) -> int:
        return self.epoch_length(global_batch, batches_per_epoch) // global_batch

    def dropped(self, global_batch: int, batches_per_epoch: int | None = None) -> int:
        """Positions at the end of each epoch that do not fill a step, left out."""
        return self.epoch_length(global_batch, batches_per_epoch) % global_batch

    def at(self, epoch: int, position: int, later: int = 0) -> tuple[int, int]:
        """(shard, sample index in the shard's manifest list) at `position` of `epoch`; `later`: the one
        that many places further in the same pass (around its end), a stand-in for a broken sample."""
        passage, offset = divmod(position, self.total)
        shard, index = self._passage(epoch, passage)[(offset + later) % self.total]
        return int(shard), int(index)

    def steps(
        self, epoch: int, position: int, epochs: int, global_batch: int, batches_per_epoch: int | None = None
    ) -> Iterator[Step]:
        """The global steps from (`epoch`, `position`) to the end of epoch `epochs` - 1."""
        length = self.epoch_length(global_batch, batches_per_epoch)
        for e in range(epoch, epochs):
            start = position if e == epoch else 0
            for p in range(start, length - global_batch + 1, global_batch):
                yield Step(e, p)

    def _passage(self, epoch: int, passage: int) -> np.ndarray:
        """One permutation of every usable sample, as rows of (shard, index)."""
        if self._cache is not None and self._cache[0] == (epoch, passage):
            return self._cache[1]
        shards = np.random.default_rng(_seed(self.seed, epoch, passage, _ORDER)).permutation(len(self.usable))
        rows = []
        for w in range(0, len(shards), self.window):
            members = np.array(
                [(s, i) for s in shards[w : w + self.window] for i in self.usable[s]], dtype=np.int64
            ).reshape(-1, 2)
            inside = np.random.default_rng(_seed(self.seed, epoch, passage, w, _ORDER)).permutation(
                len(members)
            )
            rows.append(members[inside])
        order = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
        self._cache = ((epoch, passage), order)
        return order


@dataclass(frozen=True)
class MixStep:
    """A global step of a mix: its epoch and epoch position (`Step`'s), the `source` it takes its clips
    from and `at`, the position of its first clip in that source's global order of the epoch."""

    epoch: int
    position: int
    source: int
    at: int


class MixOrder:
    """Which source each global step of an epoch takes its `global_batch` clips from, and where in that
    source's order: `steps_per_epoch` steps, sources drawn by `weights` (>= 0, not all 0)."""

    def __init__(self, weights: list[float], seed: int, steps_per_epoch: int, global_batch: int):
        total = float(sum(weights))
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)) / total
        self.seed, self.steps_per_epoch, self.global_batch = seed, steps_per_epoch, global_batch
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def sources(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per step of `epoch`: the source drawn, and how many steps of the epoch before it drew that
        source. Draw j is the j-th number of one generator seeded by (seed, epoch), whatever the length."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        draws = np.random.default_rng(_seed(self.seed, epoch, _MIX)).random(self.steps_per_epoch)
        drawn = np.minimum(np.searchsorted(self.cumulative, draws, side="right"), len(self.cumulative) - 1)
        before = np.zeros(len(drawn), dtype=np.int64)
        for source in np.unique(drawn):
            mine = drawn == source
            before[mine] = np.arange(int(mine.sum()))
        self._cache = (epoch, drawn, before)
        return drawn, before

    def steps(self, epoch: int, position: int, epochs: int) -> Iterator[MixStep]:
        """The global steps from (`epoch`, `position`: whole steps of the mix) to the end of epoch
        `epochs` - 1."""
        g = self.global_batch
        for e in range(epoch, epochs):
            drawn, before = self.sources(e)
            for j in range(position // g if e == epoch else 0, self.steps_per_epoch):
                yield MixStep(e, j * g, int(drawn[j]), int(before[j]) * g)


class TarIndex:
    """Random access to the samples of tar shards: `read(url, key)` gives the sample as webdataset's
    grouping would (member bytes by suffix, ``__key__``, ``__url__``), reading only its members. A
    shard's index comes from its tar headers, read once (the data in between is skipped over); a shard
    that is cut or corrupt gives what can be read and a ShardError naming it for the rest."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._index: dict[str, tuple[dict[str, list[tuple[str, int, int]]], str | None]] = {}
        self._files: dict[str, Any] = {}  # url -> open file, least recently used first

    def read(self, url: str, key: str) -> dict[str, Any]:
        members, problem = self._index_of(url)
        if key not in members:
            detail = problem or "the sample is not in it"
            raise ShardError(f"{url}: tar is truncated or corrupt at sample {key} ({detail})")
        f = self._file(url)
        sample: dict[str, Any] = {"__key__": key, "__url__": url}
        for suffix, offset, size in members[key]:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ShardError(
                    f"{url}: tar is truncated or corrupt at sample {key} (member {suffix} is cut)"
                )
            sample[suffix] = data
        return sample

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _index_of(self, url: str) -> tuple[dict[str, list[tuple[str, int, int]]], str | None]:
        if url in self._index:
            return self._index[url]
        members: dict[str, list[tuple[str, int, int]]] = {}
        problem = None
        try:
            with tarfile.open(url, "r:") as tar:  # headers only: tarfile seeks over each member's data
                for info in tar:
                    if not info.isfile():
                        continue
                    base, suffix = base_plus_ext(info.name)
                    if base is None:
                        continue
                    members.setdefault(base, []).append((suffix, info.offset_data, info.size))
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            problem = str(err) or type(err).__name__
        self._index[url] = (members, problem)
        return self._index[url]

    def _file(self, url: str) -> Any:
        f = self._files.pop(url, None)
        if f is None:
            if len(self._files) >= self.max_open:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            f = open(url, "rb")  # noqa: SIM115 -- kept open for the samples that follow
        self._files[url] = f
        return f
