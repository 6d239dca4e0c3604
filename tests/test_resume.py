"""A resumed run against the config its checkpoint was trained under: each change applied from the
resumed step with one line, or refused in one; the loop with fakes, the real engine and checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autosam2.config import ConfigError
from autosam2.data.batches import TrainingBatches
from autosam2.engine.checkpoint import LoopState
from autosam2.engine.resume import describe, planned_steps, reconcile
from tests.helpers import INFO, RecordingLogger, TinyModel, make_trainer

BASE = ["optim.lr=0.001", "optim.warmup_steps=2", "optim.min_lr_ratio=0.01", "train.checkpoint_every=4"]


class StopAt:
    """Stands in for StopSignal: stops the loop once `step` optimizer steps are done."""

    def __init__(self, engine, step: int):
        self.engine, self.step = engine, step

    def should_stop(self) -> bool:
        return self.engine.scheduler.last_epoch >= self.step


def train(out: Path, overrides: list[str], stop_at: int | None = None) -> tuple[LoopState, dict[int, float]]:
    """`autosam2 train`'s order with fakes: resume from `out` (auto), reconcile, fit; (the final state,
    the lr logged at each step)."""
    cfg_steps = int(next(o for o in overrides if o.startswith("train.max_steps=")).split("=")[1])
    trainer, logger = make_trainer(out, TinyModel(), steps=cfg_steps, overrides=[*BASE, *overrides])
    state = trainer.checkpointer.resume(trainer.engine, "auto")
    trainer.total_steps = reconcile(
        trainer.cfg, state, trainer.engine, trainer.data, INFO, trainer.total_steps
    )
    if stop_at is not None:
        trainer.stop = StopAt(trainer.engine, stop_at)
    state = trainer.fit(state)
    return state, lrs(logger)


def lrs(logger: RecordingLogger) -> dict[int, float]:
    return {step: m["train/lr"] for step, m in logger.metrics if "train/lr" in m}


def said(capsys, text: str) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if text in line]


def test_a_changed_lr_goes_on_at_the_new_peak_from_the_resumed_step(tmp_path, capsys):
    _, whole = train(tmp_path / "whole", ["train.max_steps=8"])
    state, _ = train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    assert state.stopped and state.step == 4
    capsys.readouterr()
    state, resumed = train(tmp_path / "run", ["train.max_steps=8", "optim.lr=0.01"])
    (line,) = said(capsys, "optim.lr")
    assert line.startswith("optim.lr 0.001 -> 0.01 from step 5: the schedule goes on from its position")
    promised = float(re.search(r"lr at step 5: (\S+) instead of (\S+)", line).group(1))
    assert f"{resumed[5]:.2e}" == f"{promised:.2e}"  # what the line said is what was logged
    for step in range(5, 9):  # the same schedule, ten times higher
        assert resumed[step] == pytest.approx(10 * whole[step], rel=1e-9)
    assert describe(state.changes) == [
        f"from step 5: optim.lr 0.001 -> 0.01 ({line.split('from step 5: ', 1)[1]})"
    ]
    assert state.config["optim"]["lr"] == 0.01


def test_a_longer_schedule_goes_on_from_where_the_cosine_stands_without_a_jump(tmp_path, capsys):
    _, first = train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    capsys.readouterr()
    state, resumed = train(tmp_path / "run", ["train.max_steps=16"])
    (line,) = said(capsys, "schedule length")
    assert line.startswith("schedule length 8 -> 16 steps (train.max_steps 8 -> 16) from step 5: the cosine")
    assert f"(lr {first[4]:.2e} at step 4)" in line
    lr = [first[4]] + [resumed[s] for s in range(5, 17)]
    # down at every step to the new end: no jump at step 5, and no early end at the old length
    assert all(b < a for a, b in zip(lr, lr[1:], strict=False)), lr
    assert resumed[16] == pytest.approx(0.001 * 0.01)  # the end of the cosine, at the new last step
    assert state.step == 16 and state.changes[0]["key"] == "train.max_steps"


def test_a_finished_schedule_run_for_longer_stays_at_its_end_value(tmp_path, capsys):
    train(tmp_path / "run", ["train.max_steps=8"])
    capsys.readouterr()
    _, resumed = train(tmp_path / "run", ["train.max_steps=12"])
    (line,) = said(capsys, "schedule length 8 -> 12")
    assert "the cosine had ended at step 8, so the lr stays at its end value 1.00e-05" in line
    assert "train.init_from" in line  # the way to a new schedule
    assert all(resumed[s] == pytest.approx(1e-5) for s in range(9, 13))


def test_a_shorter_schedule_than_the_checkpoint_is_refused(tmp_path):
    train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    with pytest.raises(ConfigError) as err:
        train(tmp_path / "run", ["train.max_steps=3"])
    message = str(err.value)
    assert "the schedule would end at step 3 (train.max_steps 8 -> 3), before step 4" in message
    assert "--resume none" in message and "\n" not in message


@pytest.mark.parametrize(
    "override, key, values",
    [
        ("optim.warmup_steps=5", "optim.warmup_steps", "2 -> 5"),
        ("optim.min_lr_ratio=0.1", "optim.min_lr_ratio", "0.01 -> 0.1"),
        ("optim.grad_accum=2", "optim.grad_accum", "1 -> 2"),
        ("data.clip_len=4", "data.clip_len", "8 -> 4"),
        ("train.seed=7", "train.seed", "0 -> 7"),
    ],
)
def test_a_setting_the_restored_state_cannot_honour_is_refused_in_one_line(tmp_path, override, key, values):
    train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    before = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    with pytest.raises(ConfigError) as err:
        train(tmp_path / "run", ["train.max_steps=8", override])
    message = str(err.value)
    assert f"{key} {values}: a resumed run cannot change it" in message and "\n" not in message
    assert f"keep {key}={values.split(' -> ')[0]}" in message and "--resume none" in message
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == before


def test_weight_decay_and_betas_go_into_the_restored_optimizer(tmp_path, capsys):
    train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    capsys.readouterr()
    overrides = [*BASE, "train.max_steps=8", "optim.weight_decay=0.05", "optim.betas=[0.8,0.99]"]
    trainer, _ = make_trainer(tmp_path / "run", TinyModel(), steps=8, overrides=overrides)
    state = trainer.checkpointer.resume(trainer.engine, "auto")
    reconcile(trainer.cfg, state, trainer.engine, trainer.data, INFO, 8)
    out = capsys.readouterr().out
    assert "optim.weight_decay 0.01 -> 0.05 from step 5: set in the restored optimizer" in out
    assert "optim.betas [0.9, 0.999] -> [0.8, 0.99] from step 5: set in the restored optimizer" in out
    groups = trainer.engine.optimizer.param_groups  # restored from the checkpoint, then set
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and {g["betas"] for g in groups} == {
        (0.8, 0.99)
    }


def test_a_batch_size_change_is_applied_where_the_epoch_stands_and_recorded(tmp_path, capsys):
    train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    capsys.readouterr()
    state, _ = train(tmp_path / "run", ["train.max_steps=8", "data.batch_size=2", "loss.dice=2.0"])
    out = capsys.readouterr().out
    assert (
        out.count("resuming at another batch size: the checkpoint was written by 1 rank(s) x 1 clip(s)") == 1
    )
    assert "resumed with other settings, in effect from step 5: loss.dice 1.0 -> 2.0" in out
    assert "data.batch_size" not in out.split("resumed with other settings")[1].splitlines()[0]
    assert {c["key"] for c in state.changes} == {"data.batch_size", "loss.dice"}
    assert (state.step, state.batch_size) == (8, 2)


def test_epochs_resumed_at_another_step_size_count_what_is_left_of_the_data(tmp_path):
    trainer, _ = make_trainer(
        tmp_path, TinyModel(), steps=1, overrides=["train.epochs=2", "data.batch_size=2"]
    )
    # at 2 clips a step the epoch holds 4 steps and drops 1 of its 9 samples
    data = TrainingBatches(lambda epoch: [], per_epoch=4, seek=lambda *a: iter(()), dropped=1)
    assert planned_steps(trainer.cfg, data, 1) == 8
    state = LoopState(step=3, epoch=0, sample=3, world_size=1, batch_size=1)  # 3 of 9 at 1 clip a step
    assert planned_steps(trainer.cfg, data, 1, state) == 3 + 3 + 4  # 6 samples are 3 steps, then epoch 1
    same = LoopState(step=3, epoch=0, sample=6, world_size=2, batch_size=1)  # 2 x 1 = 1 x 2 clips a step
    assert planned_steps(trainer.cfg, data, 1, same) == 8


def test_a_checkpoint_without_its_config_resumes_and_says_the_comparison_could_not_be_made(tmp_path, capsys):
    import json

    train(tmp_path / "run", ["train.max_steps=8"], stop_at=4)
    state_file = tmp_path / "run" / "checkpoints" / "step_00000004" / "state.json"
    saved = json.loads(state_file.read_text())
    del saved["config"], saved["changes"]
    state_file.write_text(json.dumps(saved))
    capsys.readouterr()
    state, _ = train(tmp_path / "run", ["train.max_steps=8", "optim.lr=0.01"])
    (line,) = said(capsys, "could not be compared")
    assert line.startswith("warning: the checkpoint of step 4 does not record the config")
    assert state.step == 8 and state.changes == []
