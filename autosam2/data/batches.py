"""What the training loop draws from, whatever order stands behind it: batches from a position of an epoch
on, and where a resumed run goes on at its own world size and batch size, with the line that says so.

An order either seeks or replays. The global order of a shard set (`data.order`) seeks: an epoch resumes
at the same global sample at any world size or batch size, nothing before it read, the same samples as
the uninterrupted run. The resampled shard stream (seeded per rank and worker) and a folder root's
DistributedSampler replay: the epoch's stream is run again up to the position, which counts whole
batches of this run's size; at another world size or batch size the same number of clips counts as
consumed and the order changes from there. A mix of shard sets seeks too, in whole steps: its sources
are drawn per global step, so at another step size (ranks x clips) the epoch goes on at this run's step
that many samples reach, each source where that many steps of this size put it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from autosam2.config import DataConfig
from autosam2.data.video import ClipBatch


class SavedPosition(Protocol):
    """What a checkpoint records of the data position (`engine.checkpoint.LoopState`): `batch` batches of
    `epoch` at `world_size` ranks x `batch_size` clips (0: not recorded), `sample` global samples of the
    epoch consumed (-1: not recorded)."""

    step: int
    epoch: int
    batch: int
    sample: int
    world_size: int
    batch_size: int


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run goes on in its epoch: `sample` global samples consumed, `batch` of this run's
    batches. When the checkpoint's world size or batch size differs, `moved` names the change and
    `order` what it does to the sample order (both empty otherwise)."""

    batch: int
    sample: int
    moved: str = ""
    order: str = ""


@dataclass(frozen=True)
class TrainingBatches:
    """What the loop draws from: `epoch(e)` yields epoch e's batches, the same ones every time it is
    asked; `per_epoch` batches per rank; `skipped()` counts samples skipped for bad data so far.
    `seek(epoch, position, epochs)`, given for an order that seeks, yields (epoch, batch) from global
    sample `position` of `epoch` on, through epoch `epochs` - 1, without reading what comes before;
    `dropped` positions at each epoch's end fill no whole step and are left out. `source` says where
    the clips come from, `held` how many clips one pass over the set gives (the samples or windows
    that hold a clip): an epoch of more clips cycles through the set. `mix`: the sources of a mix and
    their weights, said in the data line (empty for one source)."""

    epoch: Callable[[int], Iterable[ClipBatch]]
    per_epoch: int
    skipped: Callable[[], int] = lambda: 0
    seek: Callable[[int, int, int], Iterable[tuple[int, ClipBatch]]] | None = None
    dropped: int = 0
    source: str = ""
    held: int = 0
    mix: str = ""

    def describe(self, world_size: int, data: DataConfig) -> str:
        """The run's first line about its data: the steps of an epoch, and, when an epoch holds more
        clips than the set (data.batches_per_epoch beyond it), how many passes over the set it makes."""
        per_step = world_size * data.batch_size
        line = (
            f"data: {self.source}, {self.per_epoch} steps of {per_step} clips per epoch ({world_size} "
            f"rank(s) x {data.batch_size})"
        )
        if self.mix:
            line += f"; {self.mix}"
        elif self.seek is not None:
            line += f"; {self.dropped} sample(s) that fill no whole step dropped at each epoch's end"
        clips = self.per_epoch * per_step
        if 0 < self.held < clips:
            if data.batches_per_epoch:
                line += f"; data.batches_per_epoch={data.batches_per_epoch} goes beyond the set"
            line += (
                f"{':' if data.batches_per_epoch else ';'} an epoch's {clips} clips cycle through the "
                f"set's {self.held}, {round(clips / self.held, 2):g} passes"
            )
        return line

    def batches(
        self, epoch: int, position: int, epochs: int, global_batch: int
    ) -> Iterator[tuple[int, ClipBatch]]:
        """(epoch, batch) from `position` (global samples consumed) of `epoch` to the end of epoch
        `epochs` - 1. Without `seek`, an epoch's stream is replayed up to the position (a resume decodes
        every batch before it) and each epoch has a loader of its own."""
        if self.seek is not None:
            yield from self.seek(epoch, position, epochs)
            return
        for e in range(epoch, epochs):
            batches = iter(self.epoch(e))
            for _ in range(position // global_batch if e == epoch else 0):
                if next(batches, None) is None:
                    break
            for batch in batches:
                yield e, batch

    def resume(self, saved: SavedPosition, world_size: int, batch_size: int) -> Resumed:
        """Where a run of `world_size` ranks x `batch_size` clips goes on in the epoch `saved` stands in.
        A checkpoint without the sample count consumed its batches at its own step size (at this run's
        when it does not record one). An order that seeks goes on at that very sample; one that replays,
        after this run's whole batches."""
        now, then = (world_size, batch_size), (saved.world_size, saved.batch_size)
        per_step = world_size * batch_size
        sample = saved.sample
        if sample < 0:
            sample = saved.batch * (then[0] * then[1] if saved.world_size else per_step)
        batch = sample // per_step
        if self.seek is None or self.mix:
            sample = batch * per_step
        if not saved.world_size or then == now or not (saved.step or saved.batch):
            return Resumed(batch, sample)
        other = " and ".join(
            what for what, a, b in zip(("world size", "batch size"), then, now, strict=True) if a != b
        )
        moved = (
            f"resuming at another {other}: the checkpoint was written by {then[0]} rank(s) x {then[1]} "
            f"clip(s), this run has {now[0]} x {now[1]}"
        )
        order = (
            f"the global sample order goes on unchanged: epoch {saved.epoch} resumes at sample {sample}"
            if self.seek is not None and (not self.mix or then[0] * then[1] == per_step)
            else f"the mix draws a source per step of {per_step} clips, so its order is that of a run of "
            f"this step size from here on: epoch {saved.epoch} goes on at step {batch} of {self.per_epoch}, "
            "each source where that many steps put it"
            if self.mix
            else f"the data stream is re-derived for {now[0]} rank(s), so the sample order changes from here "
            f"on: epoch {saved.epoch} goes on after {sample} clips (batch {batch} of {self.per_epoch} per rank)"
        )
        return Resumed(batch, sample, moved, order)

    def batches_left(self, epoch: int, sample: int, epochs: int, global_batch: int) -> int:
        """This run's batches per rank from `sample` (global samples consumed) of `epoch` to the end of
        epoch `epochs` - 1."""
        this_epoch = max(0, (self.per_epoch * global_batch + self.dropped - sample) // global_batch)
        return this_epoch + (epochs - epoch - 1) * self.per_epoch
