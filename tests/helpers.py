"""What tests share besides fixtures: tiny specs, command prefixes, file damage, run overrides, servers,
and the fakes the loop is tested with (a tiny model, a batch, a recording logger)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch import nn

from autosam2.bench.mlflow_server import free_port, kill_group, start_mlflow_server  # noqa: F401 -- tests use them from here
from autosam2.config import load_config
from autosam2.data.batches import TrainingBatches
from autosam2.data.synthetic import SynthSpec
from autosam2.data.video import ClipBatch
from autosam2.engine.checkpoint import Checkpointer
from autosam2.engine.dist import DistInfo
from autosam2.engine.engines import DDPEngine
from autosam2.engine.stop import StopSignal
from autosam2.engine.trainer import Trainer

TINY = SynthSpec(train_sequences=2, valid_sequences=1, frames=12, size=64, seed=3)

# two local processes under torchrun (gloo on the CPU); append the module or script and its arguments
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar in place; `edit(name, data)` returns new bytes, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            new = edit(name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(new)
            tar.addfile(info, io.BytesIO(new))


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def noisy_empty_jpeg(path: Path, quality: int, size: int = 64) -> int:
    """Write the JPEG mask of a polyp-free frame whose compression noise stays below the threshold (a
    faint smudge of grey 40, as annotation tools leave); return the highest value it decodes to."""
    import numpy as np
    from PIL import Image

    smudge = np.zeros((size, size), np.uint8)
    smudge[size // 3 : size // 2, size // 3 : size // 2 + 4] = 40
    Image.fromarray(smudge).save(path, format="JPEG", quality=quality)
    with Image.open(path) as im:
        return int(np.asarray(im).max())


def wait_for_line(path: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(
        f"{text!r} never appeared in {path}: {path.read_text(errors='replace')[-3000:] if path.exists() else 'no log'}"
    )


def restarts(job_id: str) -> int:
    """How often SLURM restarted a job (its requeues), from `scontrol show job`."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return int(next(f for f in shown.split() if f.startswith("Restarts=")).split("=", 1)[1])


def train_overrides(data: dict[str, Path], out: Path, **extra: object) -> list[str]:
    """A few-step CPU run at 128 px (the data are 256 px): hiera-t, 2-frame clips, video mode, trainable
    decoder."""
    settings = {
        "data.train": data["train"],
        "data.valid": data["valid"],
        "data.clip_len": 2,
        "data.num_workers": 1,
        "data.shuffle_buffer": 2,
        "model.image_size": 128,
        "model.clip_mode": "video",
        "model.freeze.mask_decoder": "false",
        "optim.lr": 0.001,
        "optim.warmup_steps": 1,
        "train.max_steps": 4,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.output_dir": out,
        "train.checkpoint_every": 2,
        "train.validate_every": 4,
        "train.log_every": 1,
        "train.valid_sequences": 2,
        "tracking.system_metrics": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


# the loop's fakes ------------------------------------------------------------------------------------------

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
        self.cond_masks: list[torch.Tensor | None] = []  # each call's conditioning mask

    def forward(self, images_TBCHW: torch.Tensor, per_frame: bool = False, cond_mask_BHW=None):
        self.cond_masks.append(cond_mask_BHW)
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
    engine = DDPEngine(model, cfg.optim, steps, INFO)
    logger = RecordingLogger()
    trainer = Trainer(
        cfg,
        engine,
        TrainingBatches(lambda epoch: [batch() for _ in range(3)], 3),
        steps,
        Checkpointer(tmp_path, INFO),
        logger,
        INFO,
        stop=StopSignal(()),
    )
    return trainer, logger


def runs_of(out: Path, uri: str | None = None, experiment: str = "autosam2"):
    """(client, runs): the MLflow runs that wrote `out` (their ``output_dir`` tag) in experiment
    `experiment` of `uri`, default the store the training run in `out` recorded."""
    import mlflow

    from autosam2.tracking import OUTPUT_TAG, read_run

    client = mlflow.MlflowClient(uri or read_run(out).uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {client.tracking_uri}"
    where = str(Path(out).resolve()).replace("'", "\\'")
    return client, client.search_runs([found.experiment_id], filter_string=f"tags.{OUTPUT_TAG} = '{where}'")
