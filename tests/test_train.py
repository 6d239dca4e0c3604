"""`autosam2 train` / `evaluate`: config, 2-process DDP and DeepSpeed runs, exact resume, MLflow, outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from autosam2.engine.trainer import TRAIN_METRICS
from autosam2.train import build_parser, config_from_args
from tests.helpers import TORCHRUN_2, runs_of, train_overrides

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "autosam2.cli"]
TRAIN = [*CLI, "train"]  # one process
TORCHRUN = [*TORCHRUN_2, "-m", "autosam2.cli", "train"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# config ----------------------------------------------------------------------------------------------


def test_seed_flags_map_onto_the_config_and_overrides_come_last(tmp_path):
    args = build_parser().parse_args(
        [
            "--batch-size",
            "3",
            "--epochs",
            "7",
            "--lr",
            "0.002",
            "--cpu",
            "--output-dir",
            str(tmp_path),
            "--engine",
            "deepspeed",
            "optim.lr=0.003",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.train.device, cfg.train.engine) == (
        3,
        7,
        "cpu",
        "deepspeed",
    )
    assert cfg.optim.lr == 0.003 and cfg.train.output_dir == str(tmp_path)
    gpu = config_from_args(build_parser().parse_args(["--gpu", "1", "--checkpoint", "sam2.pt"]))
    assert gpu.train.device == "cuda:1" and gpu.model.checkpoint == "sam2.pt"


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [*TRAIN, "optim.nope=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 1
        and "autosam2 train: override 'optim.nope=1'" in result.stderr
        and "Traceback" not in result.stderr
    )


# distributed runs ----------------------------------------------------------------------------------


STARTUP_UNDER_TORCHRUN = ["spawn", "imports", "rendezvous", "build", "resume", "first_batch", "first_step"]


@pytest.mark.slow
def test_ddp_two_processes_train_checkpoint_log_and_evaluate(train_data, tmp_path):
    out = tmp_path / "ddp"
    result = run([*TORCHRUN, *train_overrides(train_data, out)])
    assert "step 4/4" in result.stdout and "valid dice" in result.stdout
    # the start-up timeline: a line for each phase torchrun's ranks can see (no SLURM: no queue or launch)
    startup = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("startup: ")]
    assert startup == [*STARTUP_UNDER_TORCHRUN, "total"], result.stdout
    assert (out / "config.yaml").read_text().count("max_steps: 4") == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert {"final.pt", "best.pt", "base.pt"} <= {p.name for p in out.iterdir()}
    # random-init SAM2: its weights once in base.pt; each weights file holds what trained (the decoder
    # and the prompt head here) and names base.pt
    assert all(
        (out / name).stat().st_size < (out / "base.pt").stat().st_size / 4 for name in ("best.pt", "final.pt")
    )

    client, (run_info,) = runs_of(out)
    params, tags = run_info.data.params, run_info.data.tags
    assert (
        params["optim.lr"] == "0.001"
        and params["model.image_size"] == "128"
        and params["train.engine"] == "ddp"
    )
    assert tags["world_size"] == "2" and tags["engine"] == "ddp" and len(tags["git_commit"]) >= 7
    for key in TRAIN_METRICS:
        assert [m.step for m in client.get_metric_history(run_info.info.run_id, key)] == [1, 2, 3, 4], key
    assert client.get_metric_history(run_info.info.run_id, "valid/dice")[0].step == 4
    for phase in [*STARTUP_UNDER_TORCHRUN, "total"]:
        (logged,) = client.get_metric_history(run_info.info.run_id, f"startup/{phase}_s")
        assert logged.step == 1 and logged.value >= 0, phase
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id)} | {
        a.path for a in client.list_artifacts(run_info.info.run_id, "weights")
    }
    artifacts |= {a.path for a in client.list_artifacts(run_info.info.run_id, "valid/step_00000004/overlays")}
    assert {
        "config.yaml",
        "weights/final.pt",
        "weights/base.pt",
        "valid/step_00000004/overlays/seq5.gif",
    } <= artifacts
    assert run_info.info.status == "FINISHED"
    out = out.rename(tmp_path / "moved")  # the weights find their base beside them

    results = tmp_path / "results"
    evaluated = run(
        [
            *CLI,
            "evaluate",
            "--weights",
            str(out / "final.pt"),
            "--data",
            str(train_data["valid"]),
            "--output-dir",
            str(results),
            "--batch-size",
            "4",
            "--episodes",
            str(train_data["root"]),
        ],
        env=ONE_THREAD,
    )
    assert "mean" in evaluated.stdout and "presence acc." in evaluated.stdout
    for seq in ("seq5", "seq6"):
        assert sorted(p.name for p in (results / "masks" / seq).iterdir()) == sorted(
            f"frame{i}.png" for i in range(1, 9)
        )
        assert (results / "overlays" / f"{seq}.gif").stat().st_size > 0
    metrics = (results / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("sequence,") and [line.split(",")[0] for line in metrics[1:]] == [
        "seq5",
        "seq6",
        "mean",
    ]

    # the same evaluation on two ranks: each takes one sequence, rank 0 gathers, the figures are the same
    shared = tmp_path / "results_2"
    evaluate_args = [
        "--weights",
        str(out / "final.pt"),
        "--data",
        str(train_data["valid"]),
        "--batch-size",
        "4",
        "--episodes",
        str(train_data["root"]),
    ]
    evaluate = ["-m", "autosam2.cli", "evaluate", *evaluate_args, "--output-dir", str(shared)]
    two = run([*TORCHRUN_2, *evaluate], env=ONE_THREAD)  # torchrun's thread count, for equal float sums
    assert "2 sequences over 2 rank(s)" in two.stdout
    one_json, two_json = (json.loads((d / "metrics.json").read_text()) for d in (results, shared))
    assert two_json["ranks"] == 2 and one_json["ranks"] == 1
    assert two_json["summary"] == one_json["summary"] and two_json["per_sequence"] == one_json["per_sequence"]
    # the per-kind figures of the synthetic set's labels: every valid frame once, whichever rank made it
    assert one_json["episodes"]["all"]["frames"] == 16 and two_json["episodes"] == one_json["episodes"]
    assert (
        sum(one_json["episodes"][k]["frames"] for k in ("clear", "occluded", "absent", "blur", "haze")) == 16
    )
    for seq in ("seq5", "seq6"):
        for mask in (results / "masks" / seq).iterdir():
            assert (shared / "masks" / seq / mask.name).read_bytes() == mask.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results_2.tmp")]


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(train_data, tmp_path):
    out = tmp_path / "ds"
    result = run(
        [
            *TORCHRUN,
            *train_overrides(
                train_data,
                out,
                **{
                    "train.engine": "deepspeed",
                    "train.deepspeed_config": "zero2",
                },
            ),
        ]
    )
    assert "step 4/4" in result.stdout
    assert (out / "checkpoints" / "step_00000004" / "deepspeed").is_dir()
    final = weights(out / "final.pt")
    assert any(k.startswith("prompt_encoder.") for k in final) and all(
        torch.isfinite(v).all() for v in final.values()
    )
    # ZeRO's optimizer state is split by rank: one process cannot take it over, and says so
    more = train_overrides(
        train_data,
        out,
        **{
            "train.engine": "deepspeed",
            "train.deepspeed_config": "zero2",
            "train.max_steps": 6,
        },
    )
    alone = subprocess.run([*TRAIN, *more], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 1, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "a DeepSpeed ZeRO checkpoint written by 2 ranks cannot be resumed by 1" in alone.stderr
    assert "Resume with 2 ranks" in alone.stderr and "Traceback" not in alone.stderr


@pytest.mark.slow
def test_a_deepspeed_checkpoint_holds_the_trained_weights_and_resumes_exactly(train_data, tmp_path):
    """Frozen parameters are what the model is built with, at every step: left out of the checkpoint, a
    run resumed from step 2 still ends with the uninterrupted run's weights, to the bit."""
    ds = {
        "train.engine": "deepspeed",
        "train.deepspeed_config": "zero2",
        "train.validate_every": 100,
        "tracking.enabled": "false",
    }
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run([*TRAIN, *train_overrides(train_data, whole, **ds)])
    module = torch.load(
        whole / "checkpoints" / "step_00000004" / "deepspeed" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )["module"]
    assert not any(k.startswith("image_encoder.") for k in module)  # frozen here
    assert set(weights(whole / "final.pt")) - {k for k in module} == set()
    shutil.copytree(whole / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    result = run([*TRAIN, *train_overrides(train_data, resumed, **ds)])
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000002'} at step 2" in result.stdout
    mine, theirs = weights(whole / "final.pt"), weights(resumed / "final.pt")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def stop_and_resume(cmd: list[str], out: Path, at: int, steps: int) -> subprocess.CompletedProcess:
    """Run `cmd`, stop both ranks with SLURM's signal once step `at` is logged, then run it again: the
    resumed run's result, checked to have resumed from the stopped one's checkpoint. The stopped ranks
    exit 75; torchrun, which has no word for a stop, reports the first as failed, ends the others
    (SIGTERM) and exits 1."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {at}/{steps}"):
            for rank in psutil.Process(proc.pid).children():  # the two ranks, as SLURM signals every task
                rank.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=300) == 1 and "exitcode  : 75" in "".join(lines), "".join(lines)[-4000:]
    stopped = [line for line in lines if line.startswith("stopped by signal at step")]
    assert stopped and not (out / "final.pt").exists(), "".join(lines)[-3000:]
    k = int(stopped[0].split("step ")[1].split(";")[0])
    assert at <= k < steps
    resumed = run(cmd)
    assert f"resumed from {out / 'checkpoints' / f'step_{k:08d}'} at step {k}" in resumed.stdout
    return resumed


@pytest.mark.slow
def test_a_run_resumes_at_another_world_size_where_the_global_order_stands(train_data, tmp_path):
    """Two ranks for two steps, one rank for two more, two ranks again: one run, each change said once,
    and the epoch's position kept in global samples (8 per epoch: 4, then 6, then 8 + 2 of epoch 1)."""
    out = tmp_path / "run"
    settings = {"train.validate_every": 100, "train.checkpoint_every": 2}
    run([*TORCHRUN, *train_overrides(train_data, out, **{**settings, "train.max_steps": 2})])
    for cmd, steps, ranks, where in ((TRAIN, 4, (2, 1), (0, 6)), (TORCHRUN, 6, (1, 2), (1, 2))):
        resumed = run([*cmd, *train_overrides(train_data, out, **{**settings, "train.max_steps": steps})])
        previous = f"step_{steps - 2:08d}"
        assert f"resumed from {out / 'checkpoints' / previous} at step {steps - 2}" in resumed.stdout
        said = [line for line in resumed.stdout.splitlines() if "resuming at another world size" in line]
        assert len(said) == 1, resumed.stdout[-3000:]
        assert f"written by {ranks[0]} rank(s) x 1 clip(s), this run has {ranks[1]} x 1" in said[0]
        assert "the global sample order goes on unchanged: epoch 0 resumes at sample" in said[0]
        assert f"step {steps}/{steps}" in resumed.stdout
        state = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "state.json").read_text())
        assert (state["step"], state["world_size"]) == (steps, ranks[1])
        assert (state["epoch"], state["sample"]) == where
    assert (out / "final.pt").exists()
    client, (run_info,) = runs_of(out)
    history = client.get_metric_history(run_info.info.run_id, "train/loss_total")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # one run across the world sizes


@pytest.mark.slow
def test_training_logs_to_a_real_mlflow_server(train_data, tmp_path, mlflow_server):
    uri = mlflow_server[0]
    out = tmp_path / "served"
    run(
        [
            *TRAIN,
            *train_overrides(
                train_data,
                out,
                **{"train.max_steps": 2, "tracking.uri": uri, "tracking.experiment": "served"},
            ),
        ]
    )
    client = mlflow.MlflowClient(uri)
    (run_info,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "train/loss_total")] == [1, 2]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_info.info.run_id)}
    assert not (out / "mlflow.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_training_goes_on_when_tracking_fails(train_data, tmp_path):
    out = tmp_path / "untracked"
    start = time.monotonic()
    result = run(
        [
            *TRAIN,
            *train_overrides(
                train_data,
                out,
                **{
                    "train.max_steps": 1,
                    "train.validate_every": 100,
                    "tracking.uri": "http://127.0.0.1:9",
                    "tracking.flush_timeout_s": 5,  # what is not sent waits for `autosam2 sync`
                    "data.batches_per_epoch": 20,  # 8 samples hold a clip
                },
            ),
        ]
    )
    assert (out / "final.pt").exists() and "step 1/1" in result.stdout
    (data_line,) = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert data_line.endswith("an epoch's 20 clips cycle through the set's 8, 2.5 passes")
    assert "127.0.0.1:9" in result.stderr
    assert time.monotonic() - start < 180


@pytest.mark.slow
def test_a_feature_cached_run_stopped_and_resumed_trains_what_the_encoder_would(train_data, tmp_path):
    """Two ranks, frames un-augmented: the cache (empty again after the resume; memory for one frame, the
    rest on the disk tier) feeds the model the encoder's own numbers, so the weights are those of a run
    that encodes every frame; the disk tier's folders are gone at the end. (A resume without the cache is
    exact to 1e-6: test_slurm and test_hosts stop and requeue runs and compare.)"""
    from autosam2.data.synthetic import SynthSpec, write_dataset
    from shards.writer import build

    # one-frame clips: the plain run encodes one frame at a time, as the cache does, so the two must
    # agree to the bit (with longer clips the encoder's batched kernels round differently, and Adam
    # makes rounding grow to where a wrong entry could hide). One 4-frame sequence, a sample per
    # frame: an epoch is 2 steps, so wherever the signal lands, frames come round again after the
    # cache was filled (before the stop, or after the resume, which starts with an empty cache)
    write_dataset(
        tmp_path / "pg", SynthSpec(train_sequences=1, valid_sequences=1, frames=4, size=128, seed=5)
    )
    build(tmp_path / "pg", "train", tmp_path / "train", frames_per_sample=1, max_shard_mb=0.0001)
    data = {**train_data, "train": tmp_path / "train"}
    settings = {
        "train.max_steps": 12,
        "train.checkpoint_every": 100,
        "train.validate_every": 100,
        "data.clip_len": 1,
        "data.augment.enabled": "false",
        "model.clip_mode": "frame",
    }
    encoded = tmp_path / "encoded"
    run([*TORCHRUN, *train_overrides(data, encoded, **settings)])
    cached = tmp_path / "cached"
    node = tmp_path / "node-local"
    cache = {"data.feature_cache": "memory", "data.feature_cache_gb": 0.0015, "data.feature_cache_dir": node}
    cmd = [*TORCHRUN, *train_overrides(data, cached, **settings, **cache)]
    stop_and_resume(cmd, cached, 3, 12)
    assert node.is_dir() and list(node.iterdir()) == []

    a, b = weights(encoded / "final.pt"), weights(cached / "final.pt")
    assert a.keys() == b.keys()
    assert max(float((a[key] - b[key]).abs().max()) for key in a) == 0.0
    client, (run_info,) = runs_of(cached)
    hits = client.get_metric_history(run_info.info.run_id, "train/feature_cache_hit_rate")
    assert sorted(m.step for m in hits) == list(range(1, 13)) and max(m.value for m in hits) == 1.0
    assert all(m.value > 0 for m in client.get_metric_history(run_info.info.run_id, "train/feature_cache_gb"))
    from_disk = client.get_metric_history(run_info.info.run_id, "train/feature_cache_disk_hit_rate")
    assert len(from_disk) == 12 and max(m.value for m in from_disk) > 0


def test_a_mix_of_single_frames_and_sequences_trains_through_trainable_memory(train_data, tmp_path):
    """Two ranks on sequences (2-frame clips) and one-frame sequences (one-frame clips: steps that leave
    the memory modules unused, then a step through them) with trainable memory: DDP is told, the run
    ends, MLflow says the mix."""
    from autosam2.config import DataConfig
    from autosam2.data.order import MixOrder
    from autosam2.data.sources import training_batches
    from autosam2.data.synthetic import SynthSpec, write_dataset
    from shards.writer import build

    write_dataset(
        tmp_path / "pg", SynthSpec(train_sequences=3, valid_sequences=1, frames=2, size=256, seed=9)
    )
    for folder in (tmp_path / "pg" / "train").glob("*/seq*"):
        sorted(folder.iterdir())[-1].unlink()  # one frame left in each sequence
    build(tmp_path / "pg", "train", tmp_path / "frames", frames_per_sample=4)
    sets = [str(train_data["train"]), str(tmp_path / "frames")]
    per_epoch = training_batches(DataConfig(train=sets, clip_len=2), 64, 0, 0, 2).per_epoch
    assert list(MixOrder([1, 1], 0, per_epoch, 2).sources(0)[0][:3]) == [1, 1, 0]
    out = tmp_path / "run"
    settings = {
        "data.train": f"[{','.join(sets)}]",
        "model.freeze.memory": "false",
        "model.image_size": 64,
        "train.max_steps": 3,
        "train.validate_every": 100,
    }
    result = run([*TORCHRUN, *train_overrides(train_data, out, **settings)])
    assert "data: mix of 2 shard sets in the global order, 5 steps of 2 clips" in result.stdout
    assert "step 3/3" in result.stdout and (out / "final.pt").exists()
    client, (run_info,) = runs_of(out)
    tags, params = run_info.data.tags, run_info.data.params
    assert tags["data_mix"].startswith("data: mix of 2 shard sets") and "1-frame clip" in tags["data_mix"]
    assert params["data.train"] == str(sets)
