"""The loop and its parts with fakes: non-finite losses, accumulation, parameter groups, LR, SLURM, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from autosam2.config import load_config
from autosam2.data.video import ClipBatch
from autosam2.engine.checkpoint import Checkpointer, StopSignal
from autosam2.engine.dist import DistInfo, map_slurm_env
from autosam2.engine.engines import DDPEngine, lr_lambda, param_groups
from autosam2.engine.trainer import LoopState, Trainer, TrainingAborted
from autosam2.errors import CheckpointError

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class TinyModel(nn.Module):
    """Stands in for AutoSAM2: forward(images, per_frame) -> (mask logits, iou, object logits)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.norm = nn.LayerNorm(4)
        self.presence = nn.Parameter(torch.zeros(1))
        self.poison: set[int] = set()
        self.calls = 0

    def forward(self, images_TBCHW: torch.Tensor, per_frame: bool = False):
        t, b = images_TBCHW.shape[:2]
        logits = self.conv(images_TBCHW.flatten(0, 1))[:, 0].unflatten(0, (t, b))
        if self.calls in self.poison:
            logits = logits * float("nan")
        self.calls += 1
        iou = torch.sigmoid(self.norm(torch.ones(4)).mean()).expand(t, b)
        return logits, iou, self.presence.expand(t, b)


def batch() -> ClipBatch:
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[:, :, 2:5, 2:5] = True
    return ClipBatch(
        torch.full((2, 1, 3, 8, 8), 100, dtype=torch.uint8),
        masks,
        masks.flatten(2).any(2),
        torch.arange(2)[:, None],
        ["v"],
    )


class RecordingLogger:
    run_id = None

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params): ...
    def set_tags(self, tags): ...
    def log_artifact(self, path, artifact_path=None): ...
    def log_text(self, text, artifact_file): ...
    def close(self, status="FINISHED"): ...


def make_trainer(
    tmp_path: Path, model: TinyModel, steps: int, overrides: list[str] | None = None
) -> tuple[Trainer, RecordingLogger]:
    cfg = load_config(
        None,
        [
            f"train.output_dir={tmp_path}",
            "train.log_every=1",
            "train.checkpoint_every=100",
            "train.epochs=100",
            *(overrides or []),
        ],
    )
    engine = DDPEngine(model, cfg, steps, INFO)
    logger = RecordingLogger()
    trainer = Trainer(
        cfg,
        engine,
        lambda epoch: [batch() for _ in range(3)],
        steps,
        Checkpointer(tmp_path, INFO),
        logger,
        INFO,
        stop=StopSignal(()),
    )
    return trainer, logger


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


def test_gradient_accumulation_steps_the_optimizer_every_k_batches(tmp_path):
    model = TinyModel()
    cfg = load_config(None, ["optim.grad_accum=3", "optim.warmup_steps=0"])
    engine = DDPEngine(model, cfg, 10, INFO)
    results = []
    for _ in range(6):
        out = engine.forward(batch().images_TBCHW.float(), False)
        engine.backward(out.mask_logits_TBHW.mean())
        results.append(engine.step())
    assert [r is None for r in results] == [True, True, False, True, True, False]
    assert engine.scheduler.last_epoch == 2


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = TinyModel()
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model.conv.weight)}


def test_warmup_then_cosine():
    cfg = load_config(None, ["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg.optim, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_slurm_variables_become_torchrun_variables():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert env["MASTER_PORT"] == str(20000 + 1234) and env["MASTER_ADDR"] in ("gpu07", "gpu")
    torchrun = {"RANK": "0", "SLURM_PROCID": "5"}
    map_slurm_env(torchrun)
    assert torchrun == {"RANK": "0", "SLURM_PROCID": "5"}  # torchrun's own variables win


def test_checkpoints_are_complete_or_absent_and_resolve(tmp_path):
    model = TinyModel()
    cfg = load_config(None, [])
    engine = DDPEngine(model, cfg, 10, INFO)
    checkpointer = Checkpointer(tmp_path, INFO, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(engine, {"step": step, "epoch": 0, "batch": step})
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
    assert state["step"] == 3 and float(model.conv.weight.detach().abs().max()) < 1.0
    rng = torch.load(tmp_path / "checkpoints" / "step_00000003" / "rng_rank0.pt", weights_only=True)
    assert "torch" in rng


def test_a_signal_stops_the_loop_with_a_checkpoint(tmp_path):
    import os
    import signal

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
