"""The training loop, and nothing else: data, engine, checkpoints, validation and tracking are handed in."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from autosam2.config import Config
from autosam2.data.transforms import prepare_batch
from autosam2.data.video import ClipBatch
from autosam2.engine.checkpoint import Checkpointer, StopSignal
from autosam2.engine.dist import DistInfo, all_reduce
from autosam2.engine.engines import Engine
from autosam2.losses import clip_losses
from autosam2.tracking import MetricLogger


class TrainingAborted(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint. `batch` counts the batches of `epoch` consumed."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    best_dice: float = -1.0
    run_id: str | None = None
    stopped: bool = False


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        batches: Callable[[int], Iterable[ClipBatch]],
        total_steps: int,
        checkpointer: Checkpointer,
        logger: MetricLogger,
        info: DistInfo,
        validate: Callable[[int], dict[str, float] | None] | None = None,
        on_best: Callable[[int, dict[str, float]], None] | None = None,
        skipped_samples: Callable[[], int] = lambda: 0,
        stop: StopSignal | None = None,
    ):
        self.cfg, self.engine, self.batches, self.total_steps = cfg, engine, batches, total_steps
        self.checkpointer, self.logger, self.info = checkpointer, logger, info
        self.validate, self.on_best, self.skipped_samples = validate, on_best, skipped_samples
        self.stop = stop or StopSignal()
        self.per_frame = cfg.model.clip_mode == "frame"

    def _epoch_batches(self, state: LoopState) -> Iterator[ClipBatch] | None:
        """This epoch's batches from the saved position on (the stream is deterministic); None when the
        epoch is shorter than that now (resumed with another world size or batch size): it is over."""
        iterator = iter(self.batches(state.epoch))
        for _ in range(state.batch):
            if next(iterator, None) is None:
                return None
        return iterator

    def fit(self, state: LoopState) -> LoopState:
        train = self.cfg.train
        self.engine.module.train()
        saved = state.step if state.step > 0 else -1  # a resumed run's step is in its checkpoint already

        def checkpoint() -> None:  # once per step: a second save of a step would replace a good folder
            nonlocal saved
            if saved != state.step:
                self.checkpointer.save(self.engine, asdict(state))
                saved = state.step

        while state.step < self.total_steps and state.epoch < train.epochs:
            iterator = self._epoch_batches(state)
            if iterator is None:
                state.epoch += 1
                state.batch = 0
                continue
            step_start = time.perf_counter()
            wait = 0.0
            while state.step < self.total_steps:
                t0 = time.perf_counter()
                batch = next(iterator, None)
                wait += time.perf_counter() - t0
                if batch is None:
                    break
                state.batch += 1
                losses = self._forward(batch)
                if all_reduce(0.0 if torch.isfinite(losses["total"]).item() else 1.0, op="max") > 0:
                    self._bad_step(state)
                    continue
                self.engine.backward(losses["total"])
                grad_norm = self.engine.step()
                if grad_norm is None:  # inside a gradient-accumulation cycle
                    continue
                state.step += 1
                state.bad_steps = 0
                elapsed = time.perf_counter() - step_start
                if state.step % train.log_every == 0 or state.step == 1:
                    self._log(state, losses, grad_norm, batch, elapsed, wait)
                step_start, wait = time.perf_counter(), 0.0
                if self.validate and (
                    state.step % train.validate_every == 0 or state.step == self.total_steps
                ):
                    self._validate(state)
                if state.step % train.checkpoint_every == 0:
                    checkpoint()
                if self.stop.should_stop():
                    state.stopped = True
                    checkpoint()
                    return state
            else:
                break  # total steps reached inside the epoch
            if state.step < self.total_steps:
                state.epoch += 1
                state.batch = 0
        checkpoint()
        return state

    def _forward(self, batch: ClipBatch) -> dict[str, torch.Tensor]:
        batch = prepare_batch(batch, self.info.device, augment=True)
        out = self.engine.forward(batch.images_TBCHW, self.per_frame)
        weights = self.cfg.loss
        return clip_losses(
            out.mask_logits_TBHW.float(),
            out.iou_TB.float(),
            out.object_logits_TB.float(),
            batch.masks_TBHW,
            batch.present_TB,
            weights,
        )

    def _bad_step(self, state: LoopState) -> None:
        self.engine.zero_grad()
        state.bad_steps += 1
        state.skipped_steps += 1
        self.logger.log_metrics({"train/skipped_steps": state.skipped_steps}, state.step)
        if state.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingAborted(
                f"{state.bad_steps} non-finite losses in a row at step {state.step} (epoch {state.epoch}, batch {state.batch}); "
                f"lower optim.lr, check the data with `python -m shards verify`, or raise train.max_bad_steps"
            )

    def _log(
        self,
        state: LoopState,
        losses: dict[str, torch.Tensor],
        grad_norm: float,
        batch: ClipBatch,
        elapsed: float,
        wait: float,
    ) -> None:
        frames = batch.num_frames * batch.batch_size * self.info.world_size * self.engine.grad_accum
        metrics = {f"train/loss_{k}": float(v.detach()) for k, v in losses.items()}
        metrics.update(
            {
                "train/lr": self.engine.lr,
                "train/grad_norm": grad_norm if math.isfinite(grad_norm) else -1.0,
                "train/frames_per_s": frames / max(elapsed, 1e-9),
                "train/data_wait_share": wait / max(elapsed, 1e-9),
                "train/skipped_samples": all_reduce(float(self.skipped_samples())),
                "train/skipped_steps": state.skipped_steps,
                "train/epoch": state.epoch,
            }
        )
        self.logger.log_metrics(metrics, state.step)
        if self.info.is_main:
            print(
                f"step {state.step}/{self.total_steps} epoch {state.epoch} loss {metrics['train/loss_total']:.4f} lr {metrics['train/lr']:.2e} {metrics['train/frames_per_s']:.1f} frames/s",
                flush=True,
            )

    def _validate(self, state: LoopState) -> None:
        results = self.validate(state.step)
        self.engine.module.train()
        if results is None:
            return
        dice = results.get("valid/dice", -1.0)
        if dice > state.best_dice:
            state.best_dice = dice
            if self.on_best:
                self.on_best(state.step, results)
