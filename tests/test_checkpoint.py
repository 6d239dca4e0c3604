"""Checkpoint folders when things go wrong: damaged or missing files, a full disk, a save cut short, pruning."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from autosam2.config import load_config
from autosam2.engine.checkpoint import Checkpointer, LoopState
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import DDPEngine
from autosam2.engine.stop import StopSignal
from autosam2.errors import CheckpointError, TrainingAborted
from autosam2.model.weights import NonFiniteWeights
from tests.helpers import INFO, TinyModel, make_trainer, train_overrides, truncate


def saved(tmp_path: Path, steps=(2, 4, 6), keep: int = 2) -> tuple[Checkpointer, DDPEngine, TinyModel]:
    model = TinyModel()
    engine = DDPEngine(model, load_config(None, []).optim, 10, INFO)
    checkpointer = Checkpointer(tmp_path, INFO, keep=keep)
    for step in steps:
        with torch.no_grad():
            model.conv.bias.fill_(float(step))  # each checkpoint's weights tell which one was loaded
        checkpointer.save(engine, LoopState(step=step, batch=step))
    return checkpointer, engine, model


def step_dir(tmp_path: Path, step: int) -> Path:
    return tmp_path / "checkpoints" / f"step_{step:08d}"


DAMAGE = {
    "no state.json": lambda f: (f / "state.json").unlink(),
    "garbage state.json": lambda f: (f / "state.json").write_text('{"step": 6, "epoch\x01'),
    "truncated engine.pt": lambda f: truncate(f / "engine.pt"),
    "truncated rng file": lambda f: truncate(f / "rng_rank0.pt", 0.9),
    "garbage rng json": lambda f: (f / "rng_rank0.json").write_text("{"),
    "rng json missing": lambda f: (f / "rng_rank0.json").unlink(),
    "counters that are not numbers": lambda f: (f / "state.json").write_text('{"step": 6, "epoch": "x"}'),
    "bytes damaged inside engine.pt": lambda f: _damage_middle(f / "engine.pt"),
}


def _damage_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


NAMED = {
    "no state.json": "state.json is missing",
    "garbage state.json": "state.json is unreadable",
    "truncated engine.pt": "engine.pt is truncated or corrupt",
    "truncated rng file": "rng_rank0.pt is truncated or corrupt",
    "garbage rng json": "rng_rank0.json is unreadable",
    "rng json missing": "rng_rank0.pt or rng_rank0.json is missing",
    "counters that are not numbers": "state.json does not hold the loop's counters",
    "bytes damaged inside engine.pt": "engine.pt is corrupt",
}


def _with_nan(folder: Path) -> None:
    """engine.pt rewritten whole (its checksums sound) with one trained value NaN."""
    state = torch.load(folder / "engine.pt", weights_only=True)
    state["model"]["conv.bias"][0] = float("nan")
    torch.save(state, folder / "engine.pt")


DAMAGE["a NaN weight"] = _with_nan
NAMED["a NaN weight"] = (
    "engine.pt holds weights that are not finite: 1 of 13 values are not finite (in conv.bias)"
)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning_and_moved_aside(tmp_path, capsys, damage):
    checkpointer, engine, model = saved(tmp_path)
    DAMAGE[damage](step_dir(tmp_path, 6))
    contents = {p.name: p.read_bytes() for p in step_dir(tmp_path, 6).iterdir()}
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 4)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: resuming from step_00000004"), warning
    assert f"step_00000006 (named by checkpoints/latest): {NAMED[damage]}" in warning[0]
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_00000006.damaged-")]
    assert len(aside) == 1 and warning[0].endswith(f"(moved to {aside[0]})"), warning
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == contents  # kept as it was
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004\n"  # names the one resumed
    state = checkpointer.load(engine, step_dir(tmp_path, 4))
    assert state.step == 4 and model.conv.bias.item() == 4.0
    for step in (6, 8, 10):  # the resumed run passes that step and prunes: the damaged folder stays
        checkpointer.save(engine, LoopState(step=step, batch=step))
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == contents
    assert checkpointer.folders() == [step_dir(tmp_path, 10), step_dir(tmp_path, 8), step_dir(tmp_path, 4)]


def test_a_deep_check_finds_a_nan_that_the_checksums_do_not(tmp_path):
    _, engine, _ = saved(tmp_path, steps=(2,))
    _with_nan(step_dir(tmp_path, 2))
    assert (
        Checkpointer.check(step_dir(tmp_path, 2)) is None
    )  # the quick check, at every save, reads no tensor
    assert Checkpointer.check(step_dir(tmp_path, 2), deep=True) == NAMED["a NaN weight"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_weights_that_are_not_finite_are_never_a_checkpoint(tmp_path, asynchronous):
    model = TinyModel()
    engine = DDPEngine(model, load_config(None, []).optim, 10, INFO)
    checkpointer = Checkpointer(tmp_path, INFO, asynchronous=asynchronous)
    checkpointer.save(engine, LoopState(step=2, batch=2))
    with torch.no_grad():
        model.conv.weight[0, 1] = float("inf")
        model.presence.fill_(float("nan"))
    with pytest.raises(NonFiniteWeights) as err:
        checkpointer.save(engine, LoopState(step=4, batch=4))
    assert str(err.value) == (
        f"{step_dir(tmp_path, 4)}: not written: the trained weights are not finite: 2 of 13 values are not "
        "finite (in presence, conv.weight); checkpoints/latest stays step_00000002"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 2)


def test_a_refused_checkpoint_ends_the_run_with_the_way_back(tmp_path):
    """Weights gone NaN in the update of a checkpoint step: the save is refused, the run ends there."""
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=10, overrides=["train.checkpoint_every=2"])
    original_step = trainer.engine.step

    def step_then_blow_up():
        norm = original_step()
        if trainer.engine.scheduler.last_epoch == 4:
            with torch.no_grad():
                trainer.engine.module.conv.bias.fill_(float("nan"))
        return norm

    trainer.engine.step = step_then_blow_up
    with pytest.raises(TrainingAborted) as err:
        trainer.fit(LoopState())
    assert str(err.value) == (
        f"{step_dir(tmp_path, 4)}: not written: the trained weights are not finite: 1 of 13 values are not "
        "finite (in conv.bias); checkpoints/latest stays step_00000002; lower optim.lr (this run: 0.0001) "
        "or check the data with `python -m shards verify`; then rerun: --resume auto goes on from "
        "step_00000002, the newest complete checkpoint with finite weights, --resume none starts over"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]


def test_a_non_finite_abort_sets_its_checkpoint_aside_and_says_how_to_go_on(tmp_path, capsys):
    """The checkpoint of the step where the losses turned non-finite holds the weights they came from:
    resuming it would fail again, so resume skips it; the message names the way back."""
    model = TinyModel()
    model.poison = set(range(4, 100))  # from its 5th forward on (after step 4) every loss is NaN
    trainer, _ = make_trainer(
        tmp_path, model, steps=10, overrides=["train.checkpoint_every=2", "train.max_bad_steps=3"]
    )
    with pytest.raises(TrainingAborted) as err:
        trainer.fit(LoopState())
    assert str(err.value) == (
        "3 non-finite losses in a row at step 4 (epoch 2, batch 1); they came from the weights of "
        "step_00000004, now set aside; lower optim.lr (this run: 0.0001) or check the data with `python -m "
        "shards verify`, or raise train.max_bad_steps; then rerun: --resume auto goes on from step_00000002, "
        "the newest complete checkpoint with finite weights, --resume none starts over"
    )
    checkpointer = Checkpointer(tmp_path, INFO)
    capsys.readouterr()
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 2)
    warning = capsys.readouterr().err
    assert (
        "skipped " + str(step_dir(tmp_path, 4)) + " (named by checkpoints/latest): set aside by the run"
        in warning
    )
    assert "3 non-finite losses in a row at step 4 (epoch 2, batch 1) came from its weights" in warning


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete(tmp_path, capsys):
    checkpointer, _, _ = saved(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 6)
    assert capsys.readouterr().err.endswith("step_00000009 (named by checkpoints/latest): does not exist\n")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000006\n"


def test_latest_wins_over_a_newer_folder_of_another_timeline(tmp_path, capsys):
    """A run resumed from an older checkpoint writes its own `latest`; the abandoned newer folders stay."""
    checkpointer, engine, _ = saved(tmp_path, steps=(2, 4, 6))
    checkpointer.protected = step_dir(tmp_path, 4)
    checkpointer.save(engine, LoopState(step=5, batch=5))
    assert step_dir(tmp_path, 6).is_dir()  # a higher step than the save: not this timeline's to prune
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 5)
    assert capsys.readouterr().err == ""


def test_nothing_complete_starts_from_scratch_and_says_so(tmp_path, capsys):
    checkpointer, _, _ = saved(tmp_path, steps=(2,))
    (step_dir(tmp_path, 2) / "state.json").unlink()
    assert checkpointer.resolve("auto") is None
    assert "no complete checkpoint" in capsys.readouterr().err
    assert Checkpointer(tmp_path / "fresh", INFO).resolve("auto") is None
    assert "starting from scratch" in capsys.readouterr().out


def test_an_explicit_resume_folder_must_be_complete(tmp_path):
    checkpointer, _, _ = saved(tmp_path, steps=(2,))
    truncate(step_dir(tmp_path, 2) / "engine.pt")
    with pytest.raises(
        CheckpointError, match=r"step_00000002: not a checkpoint folder.*engine\.pt is truncated"
    ):
        checkpointer.resolve(str(step_dir(tmp_path, 2)))


def test_a_file_that_cannot_be_read_changes_nothing_and_names_itself(tmp_path):
    checkpointer, engine, model = saved(tmp_path, steps=(2,))
    before = model.conv.bias.detach().clone()
    rng_json = step_dir(tmp_path, 2) / "rng_rank0.json"
    sound = rng_json.read_text()
    rng_json.write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"rng_rank0\.json: unreadable"):
        checkpointer.load(engine, step_dir(tmp_path, 2))
    rng_json.write_text(sound)
    (step_dir(tmp_path, 2) / "engine.pt").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    with pytest.raises(CheckpointError, match=r"step_00000002: cannot load the engine state"):
        checkpointer.load(engine, step_dir(tmp_path, 2))
    assert torch.equal(model.conv.bias, before)


def test_pruning_keeps_the_folder_resumed_from_and_a_complete_one(tmp_path, capsys):
    checkpointer, engine, _ = saved(tmp_path, steps=(2, 4))
    checkpointer.load(engine, step_dir(tmp_path, 2))  # protected from now on
    for step in (6, 8, 10):
        checkpointer.save(engine, LoopState(step=step, batch=step))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000008", "step_00000010"]
    # a damaged folder is never counted as the complete one that pruning keeps, and is moved aside
    truncate(step_dir(tmp_path, 10) / "engine.pt")
    checkpointer.save(engine, LoopState(step=12, batch=12))
    assert step_dir(tmp_path, 12).is_dir() and not step_dir(tmp_path, 10).exists()
    assert Checkpointer.check(step_dir(tmp_path, 8)) is None  # the complete one behind the new save
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].name.startswith("step_00000010.damaged-")
    assert f"moved to {aside[0]}" in capsys.readouterr().err


def test_saving_a_step_again_never_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    """Replacing a folder moves the old one aside first; dying between the two renames leaves it found."""
    checkpointer, engine, model = saved(tmp_path, steps=(2,), keep=1)
    real_rename = Path.rename

    def die_on_second_rename(self, target):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EIO, "killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", die_on_second_rename)
    with pytest.raises(CheckpointError):
        checkpointer.save(engine, LoopState(step=2, batch=9))
    monkeypatch.undo()
    assert not step_dir(tmp_path, 2).exists()
    found = checkpointer.resolve("auto")
    assert found is not None and found.name == "step_00000002.old"
    assert checkpointer.load(engine, found).batch == 2
    checkpointer.save(engine, LoopState(step=2, batch=9))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000002.old"]  # the one resumed from is kept
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 2)
    assert json.loads((step_dir(tmp_path, 2) / "state.json").read_text())["batch"] == 9


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    checkpointer, engine, _ = saved(tmp_path, steps=(2,))

    def full(folder):
        (folder / "engine.pt").write_bytes(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
        ) from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "save", full)
    with pytest.raises(CheckpointError) as err:
        checkpointer.save(engine, LoopState(step=4, batch=4))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        str(tmp_path / "checkpoints" / "step_00000004.tmp") + ": no space left on device"
    )
    assert message.endswith(
        "writing checkpoint step_00000004 (partial folder removed); step_00000002 is intact"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert checkpointer.resolve("auto") == step_dir(tmp_path, 2)


def test_a_stop_on_a_checkpoint_step_saves_that_step_once(tmp_path):
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=50, overrides=["train.checkpoint_every=2"])
    trainer.stop = StopSignal((signal.SIGUSR2,))
    saves: list[int] = []
    original_save, original_step = trainer.checkpointer.save, trainer.engine.step

    def counted(engine, state):
        saves.append(state.step)
        return original_save(engine, state)

    def step_then_signal():
        norm = original_step()
        if trainer.engine.scheduler.last_epoch == 4:
            signal.raise_signal(signal.SIGUSR2)
        return norm

    trainer.checkpointer.save = counted
    trainer.engine.step = step_then_signal
    try:
        state = trainer.fit(LoopState())
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    assert state.stopped and state.step == 4
    assert saves == [2, 4]
    # resumed at a step that is already saved, and ended there: no second save of it either
    trainer.stop = StopSignal(())
    trainer.total_steps = 4
    saves.clear()
    trainer.fit(LoopState(step=4, epoch=state.epoch, batch=state.batch))
    assert saves == []


def test_a_resume_past_the_end_of_a_shorter_epoch_goes_on_with_the_next(tmp_path):
    """Resumed with another world size or batch size, the saved position can lie beyond this epoch."""
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=5)  # 3 batches an epoch
    state = trainer.fit(LoopState(step=1, epoch=0, batch=7))
    assert state.step == 5 and state.epoch == 2


def test_checkpoints_are_complete_or_absent_and_resolve(tmp_path):
    model = TinyModel()
    cfg = load_config(None, [])
    engine = DDPEngine(model, cfg.optim, 10, INFO)
    checkpointer = Checkpointer(tmp_path, INFO, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(engine, LoopState(step=step, batch=step))
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["latest", "step_00000002", "step_00000003"]
    assert checkpointer.resolve("auto") == tmp_path / "checkpoints" / "step_00000003"
    assert checkpointer.resolve("none") is None
    (tmp_path / "checkpoints" / "step_00000004.tmp").mkdir()  # a save cut short is never picked
    assert checkpointer.latest().name == "step_00000003"
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        checkpointer.resolve(str(tmp_path))
    with torch.no_grad():
        model.conv.weight.add_(1.0)
    state = checkpointer.load(engine, checkpointer.resolve("auto"))
    assert state.step == 3 and float(model.conv.weight.detach().abs().max()) < 1.0
    rng = torch.load(tmp_path / "checkpoints" / "step_00000003" / "rng_rank0.pt", weights_only=True)
    assert "torch" in rng


def test_a_checkpoint_of_two_ranks_resumes_on_one_with_its_state_and_a_rederived_position(tmp_path, capsys):
    """Weights, optimizer and scheduler are the same at any world size (rank 0 writes them); the
    position in the epoch is kept in clips, counted in this run's batches, and said once."""
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=3)
    trainer.fit(LoopState())  # three real steps: AdamW moments and a scheduler position to restore
    written = Checkpointer(tmp_path, two).save(
        trainer.engine, LoopState(step=3, epoch=0, batch=3, world_size=2, batch_size=1)
    )
    model = TinyModel()
    engine = DDPEngine(model, load_config(None, []).optim, 10, INFO)
    state = Checkpointer(tmp_path, INFO).load(engine, written)
    for saved, loaded in zip(trainer.engine.module.parameters(), model.parameters(), strict=True):
        assert torch.equal(saved, loaded)
    saved_moments = trainer.engine.optimizer.state_dict()["state"]
    assert {k: v["exp_avg"].tolist() for k, v in engine.optimizer.state_dict()["state"].items()} == {
        k: v["exp_avg"].tolist() for k, v in saved_moments.items()
    }
    assert engine.scheduler.last_epoch == trainer.engine.scheduler.last_epoch == 3

    resumed, _ = make_trainer(tmp_path / "again", model, steps=5)  # 3 batches an epoch, 1 rank x 1 clip
    resumed.engine = engine
    seen: list[int] = []
    original = resumed.train_step
    resumed.train_step = lambda b, *rest: (seen.append(1), original(b, *rest))[1]
    capsys.readouterr()
    state = resumed.fit(state)
    said = capsys.readouterr().out
    # 3 batches x 2 ranks x 1 clip = 6 clips of epoch 0 consumed: at 1 rank that is past its 3 batches
    assert said.count("resuming at another world size") == 1
    assert "written by 2 rank(s) x 1 clip(s), this run has 1 x 1" in said and "goes on after 6 clips" in said
    assert "sample order changes" in said
    assert (state.step, state.epoch, state.batch, len(seen)) == (5, 1, 2, 2)  # epoch 0 over, 2 of epoch 1
    assert (state.world_size, state.batch_size) == (1, 1)
    assert (
        json.loads((tmp_path / "again" / "checkpoints" / "step_00000005" / "state.json").read_text())[
            "world_size"
        ]
        == 1
    )


def test_the_same_world_size_resumes_at_the_saved_batch_without_a_word(tmp_path, capsys):
    trainer, _ = make_trainer(tmp_path, TinyModel(), steps=4)
    state = trainer.fit(LoopState(step=1, epoch=0, batch=1, world_size=1, batch_size=1))
    assert "another world size" not in capsys.readouterr().out
    assert state.step == 4 and state.epoch == 1  # batches 2 and 3 of epoch 0, then 1 of epoch 1


# asynchronous saves ----------------------------------------------------------------------------------


class _HeldWrite:
    """Wraps an engine's snapshot so the background write waits until released."""

    def __init__(self, engine: DDPEngine):
        self.engine, self.started, self.release = engine, threading.Event(), threading.Event()
        self.real = engine.snapshot

    def snapshot(self):
        write = self.real()

        def held(folder):
            self.started.set()
            assert self.release.wait(30)
            write(folder)

        return held


def test_an_async_save_writes_the_state_of_its_step_and_moves_latest_only_when_complete(
    tmp_path, monkeypatch
):
    model = TinyModel()
    engine = DDPEngine(model, load_config(None, []).optim, 10, INFO)
    checkpointer = Checkpointer(tmp_path, INFO, asynchronous=True)
    engine.optimizer.zero_grad()
    model.conv.weight.sum().backward()
    engine.optimizer.step()  # AdamW moments exist, and the snapshot must not share them
    checkpointer.save(engine, LoopState(step=2, batch=2))
    checkpointer.finish()
    held = _HeldWrite(engine)
    monkeypatch.setattr(engine, "snapshot", held.snapshot)
    expected_weight = model.conv.weight.detach().clone()
    expected_moment = engine.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    state = LoopState(step=4, batch=4)
    checkpointer.save(engine, state)  # returns while the write waits
    assert held.started.wait(30)
    state.batch = 99  # the loop goes on: its later counters, weights and moments are not the checkpoint's
    with torch.no_grad():
        model.conv.weight.add_(5.0)
    engine.optimizer.zero_grad()
    model.conv.weight.sum().backward()
    engine.optimizer.step()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (tmp_path / "checkpoints" / "step_00000004.tmp").is_dir()
    assert checkpointer.latest() == step_dir(tmp_path, 2)  # what a kill now would resume from
    held.release.set()
    checkpointer.finish()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    fresh = TinyModel()
    engine2 = DDPEngine(fresh, load_config(None, []).optim, 10, INFO)
    loaded = checkpointer.load(engine2, step_dir(tmp_path, 4))
    assert loaded.batch == 4
    assert torch.equal(fresh.conv.weight, expected_weight)
    assert torch.equal(engine2.optimizer.state_dict()["state"][0]["exp_avg"], expected_moment)
    reports = checkpointer.take_reports()
    assert [r.step for r in reports] == [2, 4] and all(r.asynchronous for r in reports)
    size = sum(f.stat().st_size for f in step_dir(tmp_path, 4).rglob("*") if f.is_file())
    assert reports[1].bytes == size > 0 and reports[1].write_s > reports[1].stall_s


def test_a_failed_async_write_fails_at_the_next_save_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model = TinyModel()
    engine = DDPEngine(model, load_config(None, []).optim, 10, INFO)
    checkpointer = Checkpointer(tmp_path, INFO, asynchronous=True)
    checkpointer.save(engine, LoopState(step=2, batch=2))

    def full_disk_later():
        def write(folder):
            (folder / "engine.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        return write

    monkeypatch.setattr(engine, "snapshot", full_disk_later)
    checkpointer.save(engine, LoopState(step=4, batch=4))  # the failure is on the writer thread
    with pytest.raises(CheckpointError) as err:
        checkpointer.save(engine, LoopState(step=6, batch=6))
    assert str(err.value).endswith(
        "writing checkpoint step_00000004 (partial folder removed); step_00000002 is intact"
    ), err.value
    assert "no space left on device" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]


def test_keep_checkpoints_bounds_the_folders(tmp_path):
    checkpointer, _, _ = saved(tmp_path, steps=(1, 2, 3, 4, 5), keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004", "step_00000005"]


def test_the_loop_logs_what_each_checkpoint_cost(tmp_path):
    trainer, logger = make_trainer(tmp_path, TinyModel(), steps=4, overrides=["train.checkpoint_every=2"])
    trainer.checkpointer = Checkpointer(tmp_path, INFO, asynchronous=True)
    trainer.fit(LoopState())
    logged = {(key, step) for step, metrics in logger.metrics for key in metrics}
    for step in (2, 4):
        for key in ("train/checkpoint_s", "train/checkpoint_bytes", "train/checkpoint_write_s"):
            assert (key, step) in logged, (key, step)
    sizes = [m["train/checkpoint_bytes"] for _, m in logger.metrics if "train/checkpoint_bytes" in m]
    assert all(size > 1000 for size in sizes)


# real runs -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_whose_weights_blow_up_is_rerun_from_sound_weights(train_data, tmp_path):
    """optim.lr=1e6: step 1 leaves weights near 1e6, finite, that make every later loss non-finite. The
    run ends in one line naming the way back and sets step 1's checkpoint aside; the rerun with a sane
    lr skips it with one warning, keeps it under a damaged name, and trains from scratch to the end."""
    out = tmp_path / "out"
    quiet = {"tracking.enabled": "false", "train.checkpoint_every": 1, "train.max_bad_steps": 3}
    command = [sys.executable, "-m", "autosam2.cli", "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    blown = subprocess.run(
        [*command, *train_overrides(train_data, out, **quiet, **{"optim.lr": "1e6"})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert blown.returncode == 1, blown.stdout + blown.stderr
    assert blown.stderr.strip().splitlines() == [
        "autosam2 train: 3 non-finite losses in a row at step 1 (epoch 0, batch 4); they came from the "
        "weights of step_00000001, now set aside; lower optim.lr (this run: 1e+06) or check the data with "
        "`python -m shards verify`, or raise train.max_bad_steps; then rerun: --resume auto goes on from "
        "scratch (no complete checkpoint is left), --resume none starts over"
    ]
    rerun = subprocess.run(
        [*command, *train_overrides(train_data, out, **quiet, **{"train.max_steps": 2})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    aside = next((out / "checkpoints").glob("step_00000001.damaged-*"))
    warning = [line for line in rerun.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [
        f"warning: no complete checkpoint in {out / 'checkpoints'}, starting from scratch; skipped "
        f"{out / 'checkpoints' / 'step_00000001'} (named by checkpoints/latest): set aside by the run that "
        "resumed or wrote it: 3 non-finite losses in a row at step 1 (epoch 0, batch 4) came from its "
        f"weights (moved to {aside})"
    ]
    assert "done: 2 steps" in rerun.stdout
    assert Checkpointer.check(step_dir(out, 2), deep=True) is None
    assert (aside / "engine.pt").is_file()  # kept for a look, never resumed
