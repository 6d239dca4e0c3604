"""The GPU path (`pytest -m gpu`, run by `make gpu-check` on a device machine): bf16 train steps in both
engines inside an NCCL group, streaming inference against the clip forward in bf16, exact resume of a run
trained on the device, GPU system metrics through MLflow.

Without CUDA these tests skip, except under ``AUTOSAM2_GPU_TESTS_ON_CPU=1`` (what `make gpu-check
DRY_RUN=1` sets, in CI): then the same code runs on the CPU (gloo, DeepSpeed's CPU accelerator, bf16
autocast on the CPU), so the check cannot rot between device loans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from autosam2.bench.common import synthetic_clip
from autosam2.config import load_config
from autosam2.data.batches import TrainingBatches
from autosam2.data.transforms import model_input
from autosam2.engine.checkpoint import Checkpointer
from autosam2.engine.dist import single_process_group
from autosam2.engine.engines import build_engine
from autosam2.engine.stop import EXIT_STOPPED, StopSignal
from autosam2.engine.trainer import Trainer
from autosam2.model.sam2_builder import build_autosam2
from autosam2.tracking import MLflowLogger, NullLogger
from tests.helpers import train_overrides

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
SIZE = 256 if ON_GPU else 64  # pixels; the CPU stand-in (CI) proves the plumbing in seconds a step

# bf16 streaming (one frame through the image encoder at a time) against the clip forward (all frames
# encoded together): the same model and frames, so only bf16 rounding of differently batched kernels differs
PROB_MAX_DIFF = 0.02
PROB_MEAN_DIFF = 2e-3
OBJECT_LOGIT_DIFF = 0.05


@pytest.fixture(scope="module")
def device() -> torch.device:
    if ON_GPU:
        return torch.device("cuda")
    if os.environ.get("AUTOSAM2_GPU_TESTS_ON_CPU") == "1":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (`make gpu-check DRY_RUN=1` runs these on the CPU)")


def _clip(t_len: int, size: int) -> torch.Tensor:
    """Normalised model inputs ``[T,1,3,S,S]`` of random uint8 frames."""
    frames = torch.randint(0, 256, (t_len, 3, size, size), dtype=torch.uint8)
    return torch.stack([model_input(frame, size, "cpu") for frame in frames])


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_bf16_train_step_is_finite_in_both_engines(device, engine, tmp_path):
    cfg = load_config(
        None,
        [
            f"model.image_size={SIZE}",
            "data.clip_len=2",
            "model.freeze.mask_decoder=false",
            "train.precision=bf16",
            f"train.engine={engine}",
            f"train.output_dir={tmp_path}",
        ],
    )
    with single_process_group(device) as info:
        assert torch.distributed.get_backend() == ("nccl" if ON_GPU else "gloo")
        torch.manual_seed(0)
        model = build_autosam2(cfg.model, device).train()
        dtypes = []
        model.sam_mask_decoder.register_forward_hook(lambda m, i, out: dtypes.append(out[0].dtype))
        trainer = Trainer(
            cfg,
            build_engine(model, cfg, 4, info, autocast=True),
            TrainingBatches(lambda epoch: [], 0),
            4,
            Checkpointer(tmp_path, info),
            NullLogger(),
            info,
            stop=StopSignal(()),
        )
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        results = [trainer.train_step(synthetic_clip(2, 1, SIZE)) for _ in range(2)]
    assert all(
        r.finite and r.grad_norm is not None and torch.isfinite(torch.tensor(r.grad_norm)) for r in results
    )
    assert all(torch.isfinite(r.losses["total"]) for r in results)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes  # autocast really ran
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the step stepped


def test_streaming_inference_equals_the_clip_forward_in_bf16(device):
    torch.manual_seed(0)
    model = build_autosam2(load_config(None, [f"model.image_size={SIZE}"]).model, device).eval()
    frames = _clip(4, SIZE).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        clip = model.forward_clip(frames)
        streamed = list(model.stream(iter(frames), num_frames=len(frames), encode_batch=1))
    logits = torch.stack([out.mask_logits_BHW for out in streamed]).float()
    objects = torch.stack([out.object_logits_B for out in streamed]).float()
    prob_diff = (torch.sigmoid(logits) - torch.sigmoid(clip.mask_logits_TBHW.float())).abs()
    assert prob_diff.max() <= PROB_MAX_DIFF, float(prob_diff.max())
    assert prob_diff.mean() <= PROB_MEAN_DIFF, float(prob_diff.mean())
    assert (objects - clip.object_logits_TB.float()).abs().max() <= OBJECT_LOGIT_DIFF


def _train(device: torch.device, data: dict[str, Path], out: Path, stop_at: int | None = None) -> str:
    """`autosam2 train` on the device in fp32, deterministic kernels; with `stop_at`, SIGUSR2 (SLURM's
    time-limit signal) once that step is logged."""
    overrides = train_overrides(
        data,
        out,
        **{
            "train.device": device.type,
            "model.image_size": SIZE,
            "train.max_steps": 4,
            "train.checkpoint_every": 100,
            "train.validate_every": 100,
            "train.cudnn_benchmark": "false",
            "train.tf32": "false",
            "tracking.enabled": "false",
        },
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    cmd = [sys.executable, "-m", "autosam2.cli", "train", *overrides]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_at is not None and line.startswith(f"step {stop_at}/"):
            proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=600) == (EXIT_STOPPED if stop_at is not None else 0), "".join(lines)[-4000:]
    return "".join(lines)


def test_a_run_checkpointed_on_the_device_resumes_to_the_uninterrupted_weights(device, train_data, tmp_path):
    _train(device, train_data, tmp_path / "whole")
    stopped = _train(device, train_data, tmp_path / "parted", stop_at=2)
    assert "stopped by signal at step" in stopped and not (tmp_path / "parted" / "final.pt").exists()
    resumed = _train(device, train_data, tmp_path / "parted")
    assert "resumed from" in resumed, resumed[-2000:]
    a, b = (_final_weights(tmp_path / run) for run in ("whole", "parted"))
    assert a.keys() == b.keys()
    worst = _max_difference(a, b)
    if worst > 1e-6:  # say how far two uninterrupted runs already differ (kernels' own nondeterminism)
        _train(device, train_data, tmp_path / "again")
        noise = _max_difference(a, _final_weights(tmp_path / "again"))
        pytest.fail(f"resumed run differs by {worst:.3g}; two uninterrupted runs differ by {noise:.3g}")


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)["model"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[key].float() - b[key].float()).abs().max()) for key in a)


def test_system_metrics_of_the_device_reach_mlflow(device, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLflowLogger(uri, "gpu-check", run_name="system-metrics", system_metrics_interval_s=1)
    try:
        x = torch.randn(2048, 2048, device=device)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # keep the device busy while the monitor samples
            x = (x @ x).tanh()
        if ON_GPU:
            torch.cuda.synchronize()
    finally:
        logger.close()
    run = mlflow.MlflowClient(uri).get_run(logger.run_id)
    names = set(run.data.metrics)
    assert "system/cpu_utilization_percentage" in names, sorted(names)
    if ON_GPU:  # MLflow's GPU monitor (through nvidia-ml-py) sampled the card
        assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= names, (
            sorted(names)
        )
