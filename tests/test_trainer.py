"""The loop with fakes: non-finite losses, the abort, stop signals."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from autosam2.data.transforms import prepare_batch
from autosam2.engine.checkpoint import LoopState
from autosam2.engine.stop import StopSignal
from autosam2.errors import TrainingAborted
from autosam2.losses import clip_losses
from tests.helpers import TinyModel, batch, make_trainer


def test_a_non_finite_loss_skips_the_step_and_is_counted(tmp_path):
    model = TinyModel()
    model.poison = {1}
    trainer, logger = make_trainer(tmp_path, model, steps=4)
    state = trainer.fit(LoopState())
    assert state.step == 4 and state.skipped_steps == 1 and model.calls == 5
    skipped = [m["train/skipped_steps"] for _, m in logger.metrics if "train/skipped_steps" in m]
    assert skipped[-1] == 1
    assert all(math.isfinite(p.detach().sum()) for p in model.parameters())


def test_k_non_finite_losses_in_a_row_abort_with_a_clear_message(tmp_path):
    model = TinyModel()
    model.poison = {2, 3, 4}
    trainer, _ = make_trainer(tmp_path, model, steps=10, overrides=["train.max_bad_steps=3"])
    with pytest.raises(TrainingAborted, match="3 non-finite losses in a row at step 2"):
        trainer.fit(LoopState())


def test_a_signal_stops_the_loop_with_a_checkpoint(tmp_path):
    model = TinyModel()
    trainer, _ = make_trainer(tmp_path, model, steps=50)
    trainer.stop = StopSignal((signal.SIGUSR2,))
    original = trainer.engine.step

    def step_then_signal():
        norm = original()
        if norm is not None and trainer.engine.scheduler.last_epoch == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return norm

    trainer.engine.step = step_then_signal
    state = trainer.fit(LoopState())
    assert state.stopped and state.step == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_log_lines_carry_steps_per_s_elapsed_and_eta(tmp_path, capsys):
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=4)
    clock = iter(range(0, 1000, 2))  # every reading 2 s after the last
    trainer.clock = lambda: float(next(clock))
    trainer.fit(LoopState())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 4
    # the loop starts at 0 s; each log line reads the clock once, 2 s after the previous reading
    assert lines[0].endswith("0.50 steps/s elapsed 0:00:02 eta 0:00:06")
    assert lines[1].endswith("0.50 steps/s elapsed 0:00:04 eta 0:00:04")
    assert lines[3].endswith("0.50 steps/s elapsed 0:00:08")  # the last: nothing left to wait for


def test_the_logged_data_wait_and_frames_per_s_cover_the_whole_interval_epoch_starts_included(tmp_path):
    """Each epoch's loader takes 0.4 s to give its first batch (workers starting); the other batches are
    at hand. Logged every 3 steps across 3-batch epochs, every interval holds one such start: the logged
    wait share and frames/s are those of the whole interval, not of the one step that was logged."""
    import time

    from autosam2.data.batches import TrainingBatches
    from tests.helpers import batch

    def epoch(e: int):
        time.sleep(0.4)
        yield from (batch() for _ in range(3))

    trainer, logger = make_trainer(tmp_path, TinyModel(), steps=6, overrides=["train.log_every=3"])
    trainer.data = TrainingBatches(epoch, 3)
    start = time.perf_counter()
    trainer.fit(LoopState())
    wall = time.perf_counter() - start
    logged = {step: m for step, m in logger.metrics if "train/data_wait_share" in m}
    assert sorted(logged) == [1, 3, 6]
    for step in (3, 6):  # steps 2-3 (no epoch start: the step-1 line took it) and 4-6 (one start)
        assert 0 < logged[step]["train/frames_per_s"]
    assert logged[6]["train/data_wait_share"] > 0.4 / wall  # the 0.4 s wait at epoch 1's start is in it
    frames = 3 * 2  # three 2-frame batches of one clip since the step-3 line
    assert logged[6]["train/frames_per_s"] < frames / 0.4  # the interval's time, the wait included


class SlowValidation:
    """Validates every 2 steps and takes 0.3 s doing it."""

    def __init__(self):
        self.steps: list[int] = []

    def should_validate(self, step, total_steps):
        return step % 2 == 0

    def validate(self, step):
        self.steps.append(step)
        time.sleep(0.3)
        return None

    def save_best(self, step, summary): ...


def test_the_training_wall_time_at_each_validation_leaves_the_validations_out(tmp_path):
    trainer, logger = make_trainer(tmp_path, TinyModel(), steps=6)
    trainer.validator = SlowValidation()
    started = time.perf_counter()
    trainer.fit(LoopState())
    whole = time.perf_counter() - started
    wall = [(step, m["train/wall_s"]) for step, m in logger.metrics if "train/wall_s" in m]
    assert [step for step, _ in wall] == [2, 4, 6] == trainer.validator.steps
    assert all(a < b for (_, a), (_, b) in zip(wall, wall[1:], strict=False))
    assert wall[-1][1] < whole - 0.6  # the two validations before the last are not counted


def test_cond_mask_prob_gives_that_share_of_steps_frame_0s_ground_truth_the_same_on_every_run(tmp_path):
    calls = []
    for run in range(2):
        model = TinyModel()
        trainer, _ = make_trainer(
            tmp_path / str(run), model, steps=60, overrides=["train.cond_mask_prob=0.5"]
        )
        trainer.fit(LoopState())
        calls.append([None if m is None else m.clone() for m in model.cond_masks])
    given = [m for m in calls[0] if m is not None]
    assert 15 <= len(given) <= 45, len(given)  # 60 draws at 0.5
    assert all(torch.equal(m, batch().masks_TBHW[0]) for m in given)  # frame 0's ground truth
    assert [m is None for m in calls[0]] == [m is None for m in calls[1]]  # drawn from the seed


def test_a_step_with_a_conditioning_mask_scores_the_frames_after_frame_0(tmp_path):
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=1)
    clip = batch()
    clip.masks_TBHW[0], clip.present_TB[0] = False, False  # frame 0 unlike frame 1
    with torch.no_grad():
        logits, iou, presence = trainer.engine.module(prepare_batch(clip).images_TBCHW)
    expected = clip_losses(
        logits[1:], iou[1:], presence[1:], clip.masks_TBHW[1:], clip.present_TB[1:], trainer.cfg.loss
    )
    everything = clip_losses(logits, iou, presence, clip.masks_TBHW, clip.present_TB, trainer.cfg.loss)
    result = trainer.train_step(clip, cond_mask=True)
    assert torch.equal(trainer.engine.module.cond_masks[-1], clip.masks_TBHW[0])
    torch.testing.assert_close(result.losses["total"], expected["total"])
    assert not torch.allclose(expected["total"], everything["total"])
