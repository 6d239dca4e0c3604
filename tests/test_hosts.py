"""Two hosts on one machine (network namespaces with their own names and addresses, a slurmd each, from
launch/slurm_test_cluster.sh --hosts 2): ranks that cross a host boundary, by hand and through SLURM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from launch.__main__ import submit
from tests.helpers import TORCHRUN_2, free_port, train_overrides, wait_for_line

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm_test_cluster.sh"
ADDRESSES = {"node1": "10.231.0.1", "node2": "10.231.0.2"}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def on_host(host: str, cmd: list[str]) -> list[str]:
    """`cmd` run on a test host: in its network namespace, with its hostname (as its slurmd runs)."""
    return [
        "nsenter",
        f"--net=/run/netns/as2-{host}",
        "unshare",
        "--uts",
        "sh",
        "-c",
        f'hostname {host} && exec "$@"',
        "-",
        *cmd,
    ]


def ranks_line(text: str) -> list[tuple[str, str]]:
    """(hostname, address) per rank from the `ranks: ...` line rank 0 prints."""
    line = next(line for line in text.splitlines() if line.startswith("ranks: "))
    return [tuple(part.split()[1:]) for part in line[len("ranks: ") :].split(", ")]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def test_hosts_have_their_own_names_and_addresses_and_a_crashed_cluster_is_cleaned_up_by_start(slurm_hosts):
    for host, address in ADDRESSES.items():  # resolvable from here (and, the same file, from the hosts)
        assert (
            subprocess.run(["getent", "hosts", host], capture_output=True, text=True).stdout.split()[0]
            == address
        )
    srun = ["srun", "-N2", "-n2", "-l", "bash", "-c", "echo $(hostname) $(hostname -I)"]
    out = subprocess.run(srun, capture_output=True, text=True, timeout=60).stdout
    assert sorted(line.split(": ", 1)[1].strip() for line in out.splitlines()) == [
        f"{h} {a}" for h, a in ADDRESSES.items()
    ]

    for pidfile in (slurm_hosts / "run").glob("slurm*.pid"):  # a crash: every daemon gone at once
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    restarted = subprocess.run(
        ["bash", str(SCRIPT), "start", "--hosts", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AUTOSAM2_SLURM_DIR": str(slurm_hosts)},
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(re.findall(r"as2-node\d+", namespaces)) == ["as2-node1", "as2-node2"]
    assert Path("/etc/hosts").read_text().count("# autosam2-test-hosts") == 2
    out = subprocess.run(srun, capture_output=True, text=True, timeout=60).stdout
    assert len(out.splitlines()) == 2


def test_torchrun_by_hand_on_two_hosts_trains_as_two_ranks_on_one(slurm_hosts, train_data, tmp_path):
    settings = {"train.max_steps": 3, "train.validate_every": 100, "tracking.enabled": "false"}
    # torchrun sets OMP_NUM_THREADS=1 only for more than one process per node: the same threads for both
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    train = ["-m", "autosam2.cli", "train"]
    procs = []
    for rank, host in enumerate(ADDRESSES):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        torchrun += ["--node-rank", str(rank), "--master-addr", "node1", "--master-port", port]
        cmd = on_host(
            host, [*torchrun, *train, *train_overrides(train_data, tmp_path / "two_hosts", **settings)]
        )
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # the process group's peers are the hosts' own addresses, not loopback
    assert ranks_line(outputs[0]) == list(ADDRESSES.items())

    one = subprocess.run(
        [*TORCHRUN_2, *train, *train_overrides(train_data, tmp_path / "one_host", **settings)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stdout[-3000:]
    assert {address for _, address in ranks_line(one.stdout)} == {"127.0.0.1"}
    assert max_difference(final_weights(tmp_path / "two_hosts"), final_weights(tmp_path / "one_host")) == 0.0


def test_the_launcher_on_two_nodes_trains_like_one_node_with_two_tasks(slurm_hosts, train_data, tmp_path):
    settings = {"train.max_steps": 3, "train.validate_every": 100}
    runs = {}
    for name, layout in (
        ("two_nodes", ["--nodes", "2", "--tasks-per-node", "1"]),
        ("one_node", ["--nodes", "1", "--tasks-per-node", "2"]),
    ):
        launch = ["--cluster", "slurm", *layout, "--cpus-per-task", "1", "--time", "30"]
        (job,) = submit(["train", *launch, "--", *train_overrides(train_data, tmp_path / name, **settings)])
        runs[name] = job
    for name, job in runs.items():
        assert job.results()[0]["step"] == 3, name
        log = (tmp_path / name / "jobs" / job.job_id / f"{job.job_id}_0_log.out").read_text()
        expected = list(ADDRESSES.items()) if name == "two_nodes" else [("node1", ADDRESSES["node1"])] * 2
        assert ranks_line(log) == expected, log[-2000:]
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])  # ONE run
        assert run.data.tags["world_size"] == "2"
        assert run.data.tags["hosts"] == ("node1,node2" if name == "two_nodes" else "node1")
    # the same global batch, the same ranks and threads: the host boundary changes nothing
    assert max_difference(final_weights(tmp_path / "two_nodes"), final_weights(tmp_path / "one_node")) == 0.0


def test_a_host_that_drops_off_the_network_stops_the_other_in_bounded_time_and_the_run_resumes(
    slurm_hosts, train_data, tmp_path
):
    import threading
    import time

    timeout_s = 10
    out = tmp_path / "run"
    settings = {
        "train.max_steps": 8,
        "train.checkpoint_every": 1,
        "train.validate_every": 100,
        "train.dist_timeout_s": timeout_s,
        "tracking.enabled": "false",
    }
    env = {**ENV, "OMP_NUM_THREADS": "1"}

    def start_both() -> list[subprocess.Popen]:
        port = str(free_port())
        procs = []
        for rank, host in enumerate(ADDRESSES):
            torchrun = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
            ]
            torchrun += ["--node-rank", str(rank), "--master-addr", "node1", "--master-port", port]
            cmd = on_host(
                host,
                [*torchrun, "-m", "autosam2.cli", "train", *train_overrides(train_data, out, **settings)],
            )
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        return procs

    survivor, lost = start_both()
    lines: list[str] = []
    link_down = threading.Event()
    down_at = []

    def read() -> None:
        for line in survivor.stdout:
            lines.append(line)
            if line.startswith("step 2/") and not link_down.is_set():
                subprocess.run(["ip", "link", "set", "as2v2", "down"], check=True)  # node2 drops off
                down_at.append(time.monotonic())
                link_down.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert survivor.wait(timeout=300) != 0
        exited = time.monotonic() - down_at[0]
        reader.join(10)
    finally:
        subprocess.run(["ip", "link", "set", "as2v2", "up"], check=True)
        lost.kill()
        lost.wait(60)
    text = "".join(lines)
    # the survivor says why, and names the rank and host it lost
    assert f"no answer from another rank within train.dist_timeout_s={timeout_s} s" in text, text[-3000:]
    assert "the other ranks: 1 on node2 (10.231.0.2)" in text
    assert exited <= timeout_s + 30, exited
    print(f"survivor exited {exited:.1f} s after node2's link went down (timeout {timeout_s} s)")

    checkpoints = out / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]  # nothing half-written
    latest = (checkpoints / "latest").read_text().strip()
    assert (checkpoints / latest / "state.json").exists()
    outputs = [proc.communicate(timeout=300)[0] for proc in start_both()]  # the job again, link back up
    assert f"resumed from {checkpoints / latest}" in outputs[0], outputs[0][-3000:]
    assert (out / "final.pt").exists()


def test_sbatch_on_two_nodes_stops_both_hosts_at_one_step_requeues_and_resumes_to_the_same_weights(
    slurm_hosts, train_data, tmp_path
):
    settings = {"train.max_steps": 6, "train.checkpoint_every": 100, "train.validate_every": 100}
    env = {**os.environ, "AUTOSAM2_PROCS_PER_NODE": "1", "AUTOSAM2_PYTHON": sys.executable}

    def sbatch(name: str) -> tuple[str, Path]:
        log = tmp_path / f"{name}.out"
        cmd = [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={log}",
        ]
        cmd += [
            str(REPO / "launch" / "train.sbatch"),
            *train_overrides(train_data, tmp_path / name, **settings),
        ]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip().split(";")[0], log

    whole_id, whole_log = sbatch("whole")
    parted_id, parted_log = sbatch("parted")
    wait_for_line(parted_log, "step 2/6")
    # the time-limit signal reaches the batch shell on the first host only; the ranks agree on stopping
    subprocess.run(["scancel", "--batch", "--signal=USR2", parted_id], check=True)
    wait_for_line(parted_log, "done: 6 steps", timeout=400)
    wait_for_line(whole_log, "done: 6 steps", timeout=400)
    text = parted_log.read_text()
    assert text.count("caught SIGUSR2") == 1 and text.count("stopped by signal at step") == 1, text[-3000:]
    assert "resumed from" in text
    assert "stopped by signal" not in whole_log.read_text()  # the other job on the same hosts ran on
    assert {address for _, address in ranks_line(text)} == set(ADDRESSES.values())  # c10d on the first host
    worst = max_difference(final_weights(tmp_path / "whole"), final_weights(tmp_path / "parted"))
    assert worst <= 1e-6, worst
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'parted'}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])  # one run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert set(run.data.tags["hosts"].split(",")) == set(ADDRESSES)


def test_a_shard_array_over_both_hosts_writes_one_set_to_the_shared_folder(slurm_hosts, train_data, tmp_path):
    from shards.verify import verify

    out = tmp_path / "shards" / "train"
    args = ["shard", "--cluster", "slurm", "--num-shards", "4", "--cpus-per-task", "8", "--time", "10", "--"]
    args += [str(train_data["root"]), "--split", "train", "--out", str(out), "--frames-per-sample", "4"]
    jobs = submit([*args, "--max-shard-mb", "0.0001", "--workers", "1"])
    assert all(job.result() == 0 for job in jobs)  # the array's parts, then the merge
    assert verify(out) == []
    # a task takes a whole host (8 CPUs), so the parts ran on both
    array_id = jobs[0].job_id.split("_")[0]
    nodes = subprocess.run(
        ["sacct", "-n", "-X", "-j", array_id, "-o", "NodeList%20"], capture_output=True, text=True
    )
    assert {line.strip() for line in nodes.stdout.splitlines() if line.strip()} >= set(ADDRESSES), (
        nodes.stdout
    )
