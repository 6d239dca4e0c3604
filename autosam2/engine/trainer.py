"""The training loop, and nothing else: data, engine, checkpoints, validation and tracking are handed in.

`train_step` is one batch through the model and the engine (its frozen image-encoder features from a
FeatureCache when one is handed in), the same step the benchmarks time; `fit` walks the epochs around
it: the resumed position (as the data counts it), logging, validation, checkpoints, stop signals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from autosam2.config import ClipMode, Config
from autosam2.data.batches import TrainingBatches
from autosam2.data.order import cond_mask_draw
from autosam2.data.transforms import prepare_batch
from autosam2.data.video import ClipBatch
from autosam2.engine import startup
from autosam2.engine.checkpoint import Checkpointer, LoopState
from autosam2.engine.dist import DistInfo, all_reduce, gather_objects
from autosam2.engine.engines import Engine
from autosam2.engine.run_lock import guard
from autosam2.engine.stop import StopSignal
from autosam2.errors import TrainingAborted
from autosam2.losses import clip_losses
from autosam2.model.feature_cache import FeatureCache, frame_keys
from autosam2.model.weights import NonFiniteWeights
from autosam2.progress import hms
from autosam2.tracking import MetricLogger

# What `_log` sends every logged step (MLflow's names): each loss of `clip_losses`, then the loop's figures.
# A figure `_log` computes goes to MLflow when it is named here.
TRAIN_METRICS = (
    "train/loss_focal",
    "train/loss_dice",
    "train/loss_iou",
    "train/loss_presence",
    "train/loss_total",
    "train/lr",
    "train/grad_norm",
    "train/frames_per_s",
    "train/data_wait_share",
    "train/skipped_samples",
    "train/skipped_steps",
    "train/epoch",
)


class Validation(Protocol):
    """What the loop asks of periodic validation (`engine.validator.Validator` is the real one)."""

    def should_validate(self, step: int, total_steps: int) -> bool: ...

    def validate(self, step: int) -> dict[str, float] | None:
        """Summary metrics (``valid/...``) on rank 0; None elsewhere, or when nothing was validated."""

    def save_best(self, step: int, summary: dict[str, float]) -> None: ...


@dataclass
class StepResult:
    """One batch's losses; `grad_norm` is None inside an accumulation cycle or when the step was skipped
    (`finite` False: some rank's loss was not finite, so no rank stepped)."""

    losses: dict[str, torch.Tensor]
    grad_norm: float | None
    finite: bool


class _Interval:
    """The loop's time since the last log line: frames trained, time waiting for data (loader starts and
    epoch boundaries included), time paused for validation and checkpoints (left out of the rates)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait = self.paused = 0.0
        self.frames = 0

    def take(self) -> tuple[float, float]:
        """(frames/s, share of the time spent waiting for data) over the interval; a new one begins."""
        now = time.perf_counter()
        busy = max(now - self.start - self.paused, 1e-9)
        pace = (self.frames / busy, min(1.0, self.wait / busy))
        self.start, self.wait, self.paused, self.frames = now, 0.0, 0.0, 0
        return pace


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        data: TrainingBatches,
        total_steps: int,
        checkpointer: Checkpointer,
        logger: MetricLogger,
        info: DistInfo,
        validator: Validation | None = None,
        stop: StopSignal | None = None,
        features: FeatureCache | None = None,
    ):
        self.cfg, self.engine, self.data, self.total_steps = cfg, engine, data, total_steps
        self.checkpointer, self.logger, self.info, self.validator = checkpointer, logger, info, validator
        self.stop = stop or StopSignal()
        self.features = features
        self.per_frame = cfg.model.clip_mode == ClipMode.frame
        self.clock = time.monotonic  # the pace of the log lines (steps/s, elapsed, ETA) is read off this
        self._clock: tuple[float, int] = (self.clock(), 0)  # (start of this process's loop, its step)
        self._last_log: tuple[float, int] = self._clock
        # fit's: the step last checkpointed, the loop's start, the time it spent validating
        self._saved, self._loop_start, self._validating = -1, time.perf_counter(), 0.0

    def train_step(self, batch: ClipBatch, cond_mask: bool = False) -> StepResult:
        """Augment on the device, forward, losses; unless any rank's loss is not finite, backward and,
        on an accumulation boundary, the optimizer step. `cond_mask`: frame 0 takes its ground truth as
        its output (train.cond_mask_prob) and the losses count the frames after it."""
        batch = prepare_batch(batch, self.info.device, augment=True)
        features = None
        if self.features is not None:
            features = self.features.encode(batch.images_TBCHW.flatten(0, 1), frame_keys(batch))
        cond = batch.masks_TBHW[0] if cond_mask else None
        out = self.engine.forward(batch.images_TBCHW, self.per_frame, features, cond)
        scored = slice(1 if cond_mask else 0, None)
        losses = clip_losses(
            out.mask_logits_TBHW[scored].float(),
            out.iou_TB[scored].float(),
            out.object_logits_TB[scored].float(),
            batch.masks_TBHW[scored],
            batch.present_TB[scored],
            self.cfg.loss,
        )
        if all_reduce(0.0 if torch.isfinite(losses["total"]).item() else 1.0, op="max") > 0:
            self.engine.zero_grad()
            return StepResult(losses, None, finite=False)
        self.engine.backward(losses["total"])
        return StepResult(losses, self.engine.step(), finite=True)

    def _resume_position(self, state: LoopState) -> None:
        """The epoch's position at this run's world size and batch size, as the data's order counts it;
        a change of either is said once, with what it does to the sample order."""
        now = (self.info.world_size, self.cfg.data.batch_size)
        resumed = self.data.resume(state, *now)
        state.batch, state.sample = resumed.batch, resumed.sample
        if resumed.moved and self.info.is_main:
            print(
                f"{resumed.moved}; weights, optimizer, scheduler and step {state.step} are restored, and "
                f"{resumed.order}; {self.total_steps} steps in all",
                flush=True,
            )
        state.world_size, state.batch_size = now

    def fit(self, state: LoopState) -> LoopState:
        """Train from `state` until the planned step, the end of the last epoch or a stop signal."""
        train = self.cfg.train
        self.engine.module.train()
        self._resume_position(state)
        self._clock = self._last_log = (self.clock(), state.step)
        # a resumed run's step is in its checkpoint already
        self._saved = state.step if state.step > 0 else -1
        self._loop_start, self._validating = time.perf_counter(), 0.0
        per_step = self.info.world_size * self.cfg.data.batch_size
        interval = _Interval()
        batches = self.data.batches(state.epoch, state.sample, train.epochs, per_step)
        startup.mark("loop_start")
        first = True  # this process's first batch and step: the end of its start-up
        while state.step < self.total_steps:
            t0 = time.perf_counter()
            item = next(batches, None)
            interval.wait += time.perf_counter() - t0
            if first:
                startup.mark("first_batch")
            if item is None:
                break  # the last epoch is over
            epoch, batch = item
            if epoch != state.epoch:
                state.epoch, state.batch, state.sample = epoch, 0, 0
            state.batch += 1
            state.sample += per_step
            interval.frames += batch.num_frames * batch.batch_size * self.info.world_size
            result = self.train_step(batch, self._cond_mask(state))
            if not result.finite:
                self._bad_step(state)
                continue
            if result.grad_norm is None:  # inside a gradient-accumulation cycle
                continue
            state.step += 1
            state.bad_steps = 0
            if first:
                first = False
                self._report_startup(state.step)
            if state.step % train.log_every == 0 or state.step == 1:
                self._log(state, result, interval.take())
            if self.validator and self.validator.should_validate(state.step, self.total_steps):
                self._validate_paused(state, interval)
            if state.step % train.checkpoint_every == 0:
                self._checkpoint(state, interval)
            if state.step < self.total_steps and self.stop.should_stop():
                state.stopped = True
                self._checkpoint(state, interval, last=True)
                return state
        self._checkpoint(state, interval, last=True)
        return state

    def _cond_mask(self, state: LoopState) -> bool:
        """Whether this rank's batch takes frame 0's ground truth (train.cond_mask_prob), drawn from the
        run's seed and the batch's place in its epoch (the config allows it in video mode only)."""
        prob = self.cfg.train.cond_mask_prob
        return (
            prob > 0 and cond_mask_draw(self.cfg.train.seed, state.epoch, state.batch, self.info.rank) < prob
        )

    def _report_startup(self, step: int) -> None:
        """After this process's first step: every rank's start-up timeline, one line per phase on rank 0
        and ``startup/<phase>_s`` in the run (`autosam2.engine.startup`)."""
        startup.mark("first_step")
        marks = gather_objects(startup.TIMELINE.with_system_times())
        if not self.info.is_main:
            return
        job = startup.slurm_times()
        lines, metrics = startup.report(marks, job)
        for line in lines:
            print(line, flush=True)
        self.logger.log_metrics(metrics, step)
        out = Path(self.cfg.train.output_dir)
        if out.is_dir():  # a run's folder (a benchmark's trainer has none)
            startup.write_record(out / startup.RECORD, marks, job)

    def _checkpoint(self, state: LoopState, interval: _Interval, last: bool = False) -> None:
        """A checkpoint of this step, once (a second save would replace a good folder); `last`: wait for
        the writes. The time it takes is a pause of the interval."""
        start = time.perf_counter()
        if self._saved != state.step:
            state.run_id = state.run_id or self.logger.run_id  # known late when the store was down
            with self._abort_on_nonfinite():
                self.checkpointer.save(self.engine, state)
            self._saved = state.step
            self.logger.log_metrics({"train/checkpoint_s": self.checkpointer.last.stall_s}, state.step)
        if last:
            self.checkpointer.finish()
        for report in self.checkpointer.take_reports():
            self.logger.log_metrics(
                {"train/checkpoint_bytes": report.bytes, "train/checkpoint_write_s": report.write_s},
                report.step,
            )
        interval.paused += time.perf_counter() - start

    def _validate_paused(self, state: LoopState, interval: _Interval) -> None:
        """Validation, logged with the time to accuracy (this process's loop until now, validations
        left out); its time is a pause of the interval."""
        start = time.perf_counter()
        self.logger.log_metrics({"train/wall_s": start - self._loop_start - self._validating}, state.step)
        self._validate(state)
        spent = time.perf_counter() - start
        self._validating += spent
        interval.paused += spent

    def _bad_step(self, state: LoopState) -> None:
        state.bad_steps += 1
        state.skipped_steps += 1
        self.logger.log_metrics({"train/skipped_steps": state.skipped_steps}, state.step)
        if state.bad_steps >= self.cfg.train.max_bad_steps:
            what = (
                f"{state.bad_steps} non-finite losses in a row at step {state.step} (epoch {state.epoch}, "
                f"batch {state.batch})"
            )
            self.checkpointer.finish()
            # the checkpoint of this step holds the weights these losses came from: resuming it fails again
            marked = self.checkpointer.set_aside(state.step, f"{what} came from its weights")
            cause = f"; they came from the weights of {marked.name}, now set aside" if marked else ""
            raise TrainingAborted(f"{what}{cause}; {self._recovery(', or raise train.max_bad_steps')}")

    def _recovery(self, also: str = "") -> str:
        """What to change, and where a rerun goes on from (named on rank 0, which sees the folders)."""
        where = "the newest complete checkpoint with finite weights"
        if self.info.is_main:
            found = self.checkpointer.latest()
            where = f"{found.name}, {where}" if found else "scratch (no complete checkpoint is left)"
        return (
            f"lower optim.lr (this run: {self.cfg.optim.lr:g}) or check the data with `python -m shards "
            f"verify`{also}; then rerun: --resume auto goes on from {where}, --resume none starts over"
        )

    @contextmanager
    def _abort_on_nonfinite(self) -> Iterator[None]:
        """Weights refused as not finite (a checkpoint, best.pt) end the run with the way back."""
        try:
            yield
        except NonFiniteWeights as err:
            raise TrainingAborted(f"{err}; {self._recovery()}") from err

    def _log(self, state: LoopState, result: StepResult, pace: tuple[float, float]) -> None:
        guard("a log line")
        frames_per_s, wait_share = pace
        figures = {f"train/loss_{k}": float(v.detach()) for k, v in result.losses.items()}
        grad_norm = result.grad_norm
        figures.update(
            {
                "train/lr": self.engine.lr,
                "train/grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else -1.0,
                "train/frames_per_s": frames_per_s,
                "train/data_wait_share": wait_share,
                "train/skipped_samples": all_reduce(float(self.data.skipped())),
                "train/skipped_steps": state.skipped_steps,
                "train/epoch": state.epoch,
            }
        )
        metrics = {name: figures[name] for name in TRAIN_METRICS}
        if self.features is not None:
            metrics.update(self.features.take_stats())
        self.logger.log_metrics(metrics, state.step)
        if self.info.is_main:
            print(
                f"step {state.step}/{self.total_steps} epoch {state.epoch} loss {metrics['train/loss_total']:.4f} "
                f"lr {metrics['train/lr']:.2e} {metrics['train/frames_per_s']:.1f} frames/s {self._pace(state.step)}"
                + _cache_figures(metrics),
                flush=True,
            )

    def _pace(self, step: int) -> str:
        """``0.52 steps/s elapsed 0:01:23 eta 0:04:29``: steps/s since the last log line; elapsed and the
        ETA from this process's loop (validation and checkpoints included, as they will recur)."""
        now = self.clock()
        (start, first), (last, last_step) = self._clock, self._last_log
        self._last_log = (now, step)
        rate = (step - last_step) / max(now - last, 1e-9)
        text = f"{rate:.2f} steps/s elapsed {hms(now - start)}"
        if step > first and step < self.total_steps:
            text += f" eta {hms((self.total_steps - step) * (now - start) / (step - first))}"
        return text

    def _validate(self, state: LoopState) -> None:
        summary = self.validator.validate(state.step)
        self.engine.module.train()
        if summary is None:
            return
        dice = summary.get("valid/dice", -1.0)
        if dice > state.best_dice:
            state.best_dice = dice
            with self._abort_on_nonfinite():
                self.validator.save_best(state.step, summary)


def _cache_figures(metrics: dict[str, float]) -> str:
    """`` cache hit 85% (disk 20%), 2.75 MB/frame``: the feature cache's figures for the step line."""
    if "train/feature_cache_hit_rate" not in metrics:
        return ""
    text = f" cache hit {metrics['train/feature_cache_hit_rate']:.0%}"
    if "train/feature_cache_disk_hit_rate" in metrics:
        text += f" (disk {metrics['train/feature_cache_disk_hit_rate']:.0%})"
    return text + f", {metrics['train/feature_cache_bytes_per_frame'] / 1e6:.2f} MB/frame"
