"""The launchers on a real single-node SLURM (started by launch/slurm_test_cluster.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import torch

from launch.__main__ import submit
from shards.verify import verify
from tests.helpers import TORCHRUN_2, restarts, runs_of, train_overrides, wait_for_line

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


SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "slurm_test_cluster.sh"


def _cluster_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The script on the session's cluster (its state folder from SLURM_CONF), or on `env`'s."""
    env = {**os.environ, "AUTOSAM2_SLURM_DIR": str(Path(os.environ["SLURM_CONF"]).parent), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def _runs_a_job(conf: Path | None = None) -> str:
    """What `srun hostname` printed: slurmctld, slurmd and munge all answer (of the cluster of `conf`;
    by default SLURM_CONF's)."""
    return subprocess.run(
        ["srun", "-N1", "-n1", "--time", "1", "hostname"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "SLURM_CONF": str(conf or os.environ["SLURM_CONF"])},
    ).stdout.strip()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_test_cluster_restarts_at_once_and_past_a_munged_that_does_not_answer(slurm_cluster):
    """`stop` then `start` straight away gives a working cluster (stop waits for every daemon it
    stopped); and `start` judges munge by its socket: the cluster's munged that exists but answers
    nothing (frozen here with SIGSTOP, as one still exiting) is replaced, so slurmdbd can reach munge."""
    import signal

    munged = slurm_cluster / "munge" / "munged.pid"
    before = int(munged.read_text())
    stopped = _cluster_script("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not _alive(before), "stop left the cluster's munged"
    started = _cluster_script("start")
    assert started.returncode == 0, started.stderr
    assert _runs_a_job()

    # the job's end reaches slurmctld through munge too: frozen before that, the node stays COMPLETING
    deadline = time.monotonic() + 60
    while (
        subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip() != "idle"
    ):
        assert time.monotonic() < deadline, "the node did not go idle after its job"
        time.sleep(0.3)
    frozen = int(munged.read_text())
    os.kill(frozen, signal.SIGSTOP)
    try:
        started = _cluster_script("start")
        assert started.returncode == 0, started.stderr
        now = int(munged.read_text())
        assert now != frozen and _alive(now), f"the frozen munged {frozen} is still the one"
        subprocess.run(
            ["sacctmgr", "-n", "list", "cluster"], capture_output=True, text=True, timeout=60, check=True
        )
        assert _runs_a_job()
    finally:
        if _alive(frozen):
            os.kill(frozen, signal.SIGKILL)


# Stands in for a daemon the test cluster did not start: a process of the daemon's name (argv[1]) that
# listens on the ports it is given (where it can: one the machine's own daemon holds is as good) and
# prints them.
DECOY = """
import socket, sys, time
with open("/proc/self/comm", "w") as comm:
    comm.write(sys.argv[1])
held = []
for port in sys.argv[2:]:
    sock = socket.socket()
    try:
        sock.bind(("0.0.0.0", int(port)))
    except OSError:
        continue
    sock.listen()
    held.append(sock)
print(" ".join(str(sock.getsockname()[1]) for sock in held), flush=True)
time.sleep(3600)
"""
# each daemon's pid file in a state folder
PIDFILES = {
    "slurmctld": "run/slurmctld.pid",
    "slurmd": "run/slurmd.pid",
    "slurmdbd": "run/slurmdbd.pid",
    "mariadbd": "run/mysqld.pid",
    "munged": "munge/munged.pid",
}


def _free_block(size: int) -> int:
    """The first of `size` consecutive ports that nothing holds, in the test cluster's default range."""
    import socket

    for first in range(15000, 20000 - size, size):
        socks = [socket.socket() for _ in range(size)]
        try:
            for port, sock in enumerate(socks, first):
                sock.bind(("0.0.0.0", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no block of free ports in 15000-19999")


def test_the_test_cluster_starts_beside_daemons_it_did_not_start_and_stops_only_its_own(
    slurm_cluster, tmp_path
):
    """A second test cluster beside the session's and beside processes named like SLURM's, munge's and
    MariaDB's daemons: they hold the default ports and some of the ports the cluster may take, and
    their pids stand in the new cluster's pid files (a crashed run's files, the pids taken since).
    `start` neither reuses nor stops them and takes the free ports left, or fails in one line and
    starts nothing where there are none; `stop` stops only what it started: the decoys and the
    session's cluster run on."""
    import shutil
    import sys
    import tempfile

    first = _free_block(8)
    taken = {"slurmctld": [6817, first], "slurmd": [6818, first + 2], "slurmdbd": [6819, first + 4]}
    taken |= {"mariadbd": [3306], "munged": []}
    # state folders where munged (its own user) can reach them, unlike pytest's tmp_path
    base = Path(tempfile.mkdtemp(prefix="autosam2-slurm-test-", dir="/tmp"))
    base.chmod(0o755)
    state, full = base / "cluster", base / "full"
    decoys: dict[str, subprocess.Popen] = {}
    daemons: dict[str, int] = {}
    try:
        for name, ports in taken.items():
            decoys[name] = subprocess.Popen(
                [sys.executable, "-c", DECOY, name, *map(str, ports)], stdout=subprocess.PIPE, text=True
            )
            held = decoys[name].stdout.readline().split()  # ready: named, and listening
            assert all(str(port) in held for port in ports if port >= first), (name, held)
        for name, path in PIDFILES.items():
            (state / path).parent.mkdir(parents=True, exist_ok=True)
            (state / path).write_text(f"{decoys[name].pid}\n")

        refused = _cluster_script(
            "start", AUTOSAM2_SLURM_DIR=str(full), AUTOSAM2_SLURM_PORTS=f"{first}-{first}"
        )
        assert refused.returncode == 1 and refused.stderr.splitlines() == [
            f"slurm-test-cluster: fewer than 4 free TCP ports in {first}-{first} (AUTOSAM2_SLURM_PORTS)"
            " for slurmctld, slurmd, slurmdbd and MariaDB"
        ]
        assert not (full / "slurm.conf").exists()

        env = {"AUTOSAM2_SLURM_DIR": str(state), "AUTOSAM2_SLURM_PORTS": f"{first}-{first + 7}"}
        started = _cluster_script("start", **env)
        assert started.returncode == 0, started.stderr
        ports = dict(line.split("=") for line in (state / "ports").read_text().split())
        assert {int(port) for port in ports.values()} <= {
            first + 1,
            first + 3,
            first + 5,
            first + 6,
            first + 7,
        }
        assert len(set(ports.values())) == 4
        assert _runs_a_job(state / "slurm.conf")
        daemons = {name: int((state / path).read_text()) for name, path in PIDFILES.items()}
        assert not set(daemons.values()) & {decoy.pid for decoy in decoys.values()}
        assert all(_alive(pid) for pid in daemons.values()), daemons
    finally:
        stopped = _cluster_script("stop", AUTOSAM2_SLURM_DIR=str(state))
        alive = {name: decoy.poll() is None for name, decoy in decoys.items()}
        for decoy in decoys.values():
            decoy.kill()
            decoy.wait()
        shutil.rmtree(base, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert all(alive.values()), alive
    assert not [name for name, pid in daemons.items() if _alive(pid)]
    assert _runs_a_job()  # the session's cluster, its own munged and database


@pytest.mark.parametrize("how", ["time limit", "scontrol requeue"])  # preemption: as a training job
def test_an_interrupted_evaluation_job_requeues_and_resumes_to_the_same_metrics(
    slurm_cluster, weights, tmp_path, how
):
    """In the middle of the split, SLURM's time-limit signal (SIGUSR2: submitit requeues the job) or
    `scontrol requeue` (SIGTERM: SLURM requeues it): both ranks
    stop at the end of their sequence in progress, the requeued job goes on with --resume, and its
    metrics.json is byte for byte that of an uninterrupted job."""
    from autosam2.data.synthetic import SynthSpec, write_dataset

    data = tmp_path / "polyp_gen"  # 8 sequences of 30 frames: a few seconds each on one CPU
    write_dataset(data, SynthSpec(train_sequences=1, valid_sequences=8, frames=30, size=64, seed=2))
    args = ["--", "--weights", str(weights), "--data", str(data), "--cpu", "--output-dir"]
    (whole,) = submit(["evaluate", *LAUNCH, *args, str(tmp_path / "whole")])
    (parted,) = submit(["evaluate", *LAUNCH, *args, str(tmp_path / "parted")])
    deadline = time.monotonic() + 600  # the node may run the uninterrupted job first
    while not list((tmp_path / "parted" / "sequences").glob("*.json")):
        assert time.monotonic() < deadline, "no sequence was kept"
        time.sleep(0.2)
    if how == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", parted.job_id], check=True, timeout=60)
    else:
        parted._interrupt(timeout=how == "time limit")  # the time limit: SIGUSR2 alone
    log = tmp_path / "parted.jobs" / parted.job_id / f"{parted.job_id}_0_log.out"
    wait_for_line(log, "wrote ", timeout=600)  # the requeued run's last line
    assert parted.results()[0] == 0 and whole.results()[0] == 0
    text = log.read_text()
    # after `scontrol requeue` SLURM kills the ranks KillWait seconds after its SIGTERM, which may come
    # before a loaded machine ends the sequence in progress: the stop line may not be written
    assert how != "time limit" or "stopped by SIGUSR2: " in text, text[-3000:]
    assert "sequences finished before, skipped" in text and "Traceback" not in text, text[-3000:]
    kept = int(text.split("resuming ")[1].split(": ")[1].split(" sequences finished before")[0])
    assert 1 <= kept < 8, text[-3000:]  # stopped mid-split
    assert text.count("Starting with JobEnvironment") == 2 and restarts(parted.job_id) == 1
    metrics = [(tmp_path / name / "metrics.json").read_bytes() for name in ("whole", "parted")]
    assert metrics[0] == metrics[1]
    assert json.loads(metrics[1])["ranks"] == 2


def test_evaluate_sbatch_requeues_on_sigusr2_and_resumes_to_the_same_metrics(
    slurm_cluster, weights, tmp_path
):
    """`sbatch launch/evaluate.sbatch` with two ranks: SIGUSR2 to the batch shell in the middle of the
    split (SLURM's time-limit signal, --signal=B:USR2) reaches both ranks through srun; they stop at the
    end of their sequence in progress, the job requeues itself once, goes on with --resume in the same
    log (--open-mode=append), and its metrics.json is byte for byte that of an uninterrupted job."""
    import sys

    from autosam2.data.synthetic import SynthSpec, write_dataset

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "polyp_gen"  # 8 sequences of 30 frames: a few seconds each on one CPU
    write_dataset(data, SynthSpec(train_sequences=1, valid_sequences=8, frames=30, size=64, seed=2))
    env = {**os.environ, "AUTOSAM2_PYTHON": sys.executable}

    def submitted(name: str) -> tuple[str, Path]:
        log = tmp_path / f"{name}.out"
        done = subprocess.run(
            ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
             f"--output={log}", str(repo / "launch" / "evaluate.sbatch"), "--weights", str(weights),
             "--data", str(data), "--cpu", "--output-dir", str(tmp_path / name)],
            cwd=repo, env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return done.stdout.strip().split(";")[0], log

    whole, whole_log = submitted("whole")
    parted, log = submitted("parted")
    deadline = time.monotonic() + 600  # the node may run the uninterrupted job first
    while not list((tmp_path / "parted" / "sequences").glob("*.json")):
        assert time.monotonic() < deadline, "no sequence was kept"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", parted], check=True, timeout=60)
    for path in (log, whole_log):
        wait_for_line(path, "wrote ", timeout=600)  # the last line of a finished evaluation
    deadline = time.monotonic() + 120
    while (states := [_job_state(job) for job in (whole, parted)]) != ["COMPLETED", "COMPLETED"]:
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    text = log.read_text()
    line = f"caught SIGUSR2, stopping at the end of the sequences in progress and requeueing job {parted}"
    assert text.count(line) == 1 and "stopped by SIGUSR2: " in text, text[-3000:]
    assert "sequences finished before, skipped" in text and "Traceback" not in text, text[-3000:]
    kept = int(text.split("resuming ")[1].split(": ")[1].split(" sequences finished before")[0])
    assert 1 <= kept < 8, text[-3000:]  # stopped mid-split
    assert restarts(parted) == 1 and restarts(whole) == 0
    metrics = [(tmp_path / name / "metrics.json").read_bytes() for name in ("whole", "parted")]
    assert metrics[0] == metrics[1]
    assert json.loads(metrics[1])["ranks"] == 2


def _job_state(job_id: str) -> str:
    """A job's state (PENDING, RUNNING, COMPLETED, ...), from `scontrol show job`."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return next(f for f in shown.split() if f.startswith("JobState=")).split("=", 1)[1]
