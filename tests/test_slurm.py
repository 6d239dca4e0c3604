"""The launchers on a real single-node SLURM (started by launch/slurm_test_cluster.sh)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import torch

from launch.__main__ import submit
from shards.verify import verify
from tests.helpers import TORCHRUN_2, runs_of, train_overrides, wait_for_line

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
LAUNCH = ["--cluster", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30"]


def train_args(train_data: dict[str, Path], out: Path, **extra: object) -> list[str]:
    return ["--", *train_overrides(train_data, out, **extra)]


def test_interrupted_job_requeues_and_resumes_to_the_same_weights(slurm_cluster, train_data, tmp_path):
    settings = {"train.max_steps": 6, "train.checkpoint_every": 100, "train.validate_every": 100}
    (whole,) = submit(["train", *LAUNCH, *train_args(train_data, tmp_path / "whole", **settings)])
    (parted,) = submit(["train", *LAUNCH, *train_args(train_data, tmp_path / "parted", **settings)])
    log = tmp_path / "parted" / "jobs" / parted.job_id / f"{parted.job_id}_0_log.out"
    wait_for_line(log, "step 2/6")
    parted._interrupt()  # preemption: SIGTERM, then SIGUSR2, as SLURM sends
    # until the requeued job runs, sacct can report the first run as COMPLETED, which submitit reads
    # as the end of a job that left no result: wait for the second run's end in its log first
    wait_for_line(log, "done: 6 steps", timeout=600)
    result = parted.results()[0]
    assert result["step"] == 6 and not result["stopped"]
    assert whole.results()[0]["step"] == 6
    text = log.read_text()
    assert "stopped by signal at step" in text and "resumed from" in text, text[-3000:]
    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "parted" / "final.pt", weights_only=True)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_shard_array_job_writes_a_set_that_verify_accepts(slurm_cluster, train_data, tmp_path):
    out = tmp_path / "shards" / "train"
    jobs = submit(
        [
            "shard",
            "--cluster",
            "slurm",
            "--num-shards",
            "3",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
            "--",
            str(train_data["root"]),
            "--split",
            "train",
            "--out",
            str(out),
            "--frames-per-sample",
            "4",
            "--max-shard-mb",
            "0.0001",
            "--workers",
            "1",
        ]
    )
    assert len(jobs) == 4 and all(isinstance(j, submitit.SlurmJob) for j in jobs)
    for job in jobs:
        assert job.result() == 0
    assert verify(out) == []
    parts = {
        s["name"].split("-")[1]
        for s in __import__("json").loads((out / "manifest.json").read_text())["shards"]
    }
    assert parts == {"000", "001", "002"}


def test_a_failing_job_surfaces_its_own_error(slurm_cluster, train_data, tmp_path):
    import shutil

    from tests.helpers import truncate

    broken = tmp_path / "broken"
    shutil.copytree(train_data["train"], broken)
    for shard in broken.glob("*.tar"):
        truncate(shard, 0.5)  # found by the job's loader, not at submission (the manifest is sound)
    started = time.monotonic()
    (job,) = submit(["train", *LAUNCH, *train_args({**train_data, "train": broken}, tmp_path / "failing")])
    with pytest.raises(submitit.core.utils.FailedJobError) as err:
        job.results()
    assert "tar is truncated or corrupt" in str(err.value)
    # srun --kill-on-bad-exit: the other task does not wait in a collective for the 30 min timeout
    assert time.monotonic() - started < 300


def test_an_input_missing_at_submission_submits_nothing(slurm_cluster, train_data, tmp_path, capsys):
    from launch.__main__ import main

    out = tmp_path / "never"
    code = main(["train", *LAUNCH, *train_args({**train_data, "train": tmp_path / "nowhere"}, out)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"data.train={tmp_path / 'nowhere'}: neither a shard set" in err and "Traceback" not in err
    assert not out.exists()


def test_sbatch_template_trains_and_requeues_on_sigusr2(slurm_cluster, train_data, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "sbatch"
    overrides = train_overrides(
        train_data, out, **{"train.max_steps": 6, "train.checkpoint_every": 100, "train.validate_every": 100}
    )
    env = {**os.environ, "AUTOSAM2_PROCS_PER_NODE": "2", "AUTOSAM2_PYTHON": sys.executable}
    log = tmp_path / "train.out"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={log}",
            str(repo / "launch" / "train.sbatch"),
            *overrides,
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    wait_for_line(log, "step 2/6")
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    wait_for_line(log, "done: 6 steps", timeout=400)
    text = log.read_text()
    assert "caught SIGUSR2, checkpointing and requeueing" in text and "stopped by signal at step" in text
    assert "resumed from" in text and (out / "final.pt").exists()


def test_same_config_same_weights_under_srun_the_launcher_and_torchrun(slurm_cluster, train_data, tmp_path):
    """One thread rule in every launch path (SLURM's --cpus-per-task, torchrun's OMP_NUM_THREADS): 2 ranks
    of one thread each under plain srun, the launcher and torchrun end with the same weights. The
    launcher's two-task job completes with its logs and MLflow run; plain srun maps SLURM's variables
    (world size, job id)."""
    import sys

    settings = {"train.max_steps": 3, "train.validate_every": 100, "train.checkpoint_every": 100}
    (job,) = submit(["train", *LAUNCH, *train_args(train_data, tmp_path / "launcher", **settings)])
    train = [sys.executable, "-m", "autosam2.cli", "train"]
    commands = {
        "srun": ["srun", "--ntasks=2", "--cpus-per-task=1", "--time=10", *train],
        "torchrun": [*TORCHRUN_2, "-m", "autosam2.cli", "train"],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    for name, command in commands.items():
        result = subprocess.run(
            [*command, *train_overrides(train_data, tmp_path / name, **settings)],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-3000:]
        assert "step 3/3" in result.stdout, result.stdout
    result = job.results()[0]  # the launcher's job: its result, its logs, its MLflow run
    assert isinstance(job, submitit.SlurmJob) and result["step"] == 3 and not result["stopped"]
    assert (tmp_path / "launcher" / "jobs" / job.job_id / f"{job.job_id}_1_log.out").exists()
    client, (run,) = runs_of(tmp_path / "launcher")
    assert run.info.status == "FINISHED" and run.data.tags["slurm_job_id"] == job.job_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")] == [1, 2, 3]
    sources = {}
    for name in ("srun", "launcher", "torchrun"):
        client, (run,) = runs_of(tmp_path / name)
        assert run.data.tags["world_size"] == "2" and run.data.tags["torch_threads"] == "1", name
        sources[name] = run.data.tags["torch_threads_from"]
        assert (run.data.tags["slurm_job_id"] == "none") == (name == "torchrun")
    assert sources == {
        "srun": "SLURM_CPUS_PER_TASK=1",
        "launcher": "SLURM_CPUS_PER_TASK=1",
        "torchrun": "OMP_NUM_THREADS=1",
    }
    a = torch.load(tmp_path / "srun" / "final.pt", weights_only=True)["model"]
    for name in ("launcher", "torchrun"):
        b = torch.load(tmp_path / name / "final.pt", weights_only=True)["model"]
        assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0, f"srun vs {name}"


def test_a_lock_held_by_a_slurm_job_on_another_host_ends_with_the_job(slurm_cluster, tmp_path):
    """From a login node, the holder's pid cannot be seen; `squeue` tells whether its job goes on."""
    import json
    import subprocess

    from autosam2.engine.run_lock import LOCK_NAME, RunLock, check_free
    from autosam2.errors import OutputDirInUse

    job = subprocess.run(
        ["sbatch", "--parsable", "--output", str(tmp_path / "sleep.out"), "--wrap", "sleep 20"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    record = {"host": "gpu-node-07", "pid": 4242, "slurm_job_id": job, "started": "now", "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    try:
        with pytest.raises(OutputDirInUse, match=f"SLURM job {job}"):
            check_free(tmp_path)
    finally:
        subprocess.run(["scancel", job], check=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            check_free(tmp_path)
            break
        except OutputDirInUse:
            assert time.monotonic() < deadline, "the cancelled job still holds the lock"
            time.sleep(0.5)
    lock = RunLock(tmp_path).acquire()
    assert f"SLURM job {job} has ended" in lock.took_over
    lock.release()


def _cluster_script(*args: str) -> subprocess.CompletedProcess:

    script = Path(__file__).resolve().parents[1] / "launch" / "slurm_test_cluster.sh"
    env = {**os.environ, "AUTOSAM2_SLURM_DIR": str(Path(os.environ["SLURM_CONF"]).parent)}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=300, env=env)


def _runs_a_job() -> str:
    """What `srun hostname` printed: slurmctld, slurmd and munge all answer."""
    return subprocess.run(
        ["srun", "-N1", "-n1", "--time", "1", "hostname"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()


def test_the_test_cluster_restarts_at_once_and_past_a_munged_that_does_not_answer(slurm_cluster):
    """`stop` then `start` straight away gives a working cluster (stop waits for every daemon it
    stopped); and `start` judges munge by its socket: a munged that exists but answers nothing (frozen
    here with SIGSTOP, as one still exiting) is replaced, so slurmdbd can reach munge."""
    import signal

    stopped = _cluster_script("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not subprocess.run(["pgrep", "-x", "munged"], capture_output=True).stdout, "stop left munged"
    started = _cluster_script("start")
    assert started.returncode == 0, started.stderr
    assert _runs_a_job()

    frozen = [
        int(p)
        for p in subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True).stdout.split()
    ]
    assert frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = _cluster_script("start")
        assert started.returncode == 0, started.stderr
        now = [
            int(p)
            for p in subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True).stdout.split()
        ]
        assert now and not set(now) & set(frozen), f"the frozen munged {frozen} is still the one: {now}"
        subprocess.run(
            ["sacctmgr", "-n", "list", "cluster"], capture_output=True, text=True, timeout=60, check=True
        )
        assert _runs_a_job()
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
