"""Hosts on one machine (network namespaces with their own names and addresses, a slurmd each, from
launch/slurm_test_cluster.sh --hosts 3): ranks that cross a host boundary, by hand and through SLURM.
Two-node jobs go wherever SLURM puts them; the third host takes over when one dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.__main__ import submit
from tests.helpers import TORCHRUN_2, free_port, restarts, runs_of, train_overrides, wait_for_line

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm_test_cluster.sh"
ADDRESSES = {"node1": "10.231.0.1", "node2": "10.231.0.2"}  # the hosts of the runs started by hand
SPARE = ("node3", "10.231.0.3")
HOSTS = {**ADDRESSES, SPARE[0]: SPARE[1]}  # SLURM puts a two-node job on any two of them
# a launcher job over two hosts, one rank on each
LAUNCH_2 = [
    "--cluster",
    "slurm",
    "--nodes",
    "2",
    "--tasks-per-node",
    "1",
    "--cpus-per-task",
    "2",
    "--time",
    "30",
]
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


def ranks_lines(text: str) -> list[list[tuple[str, str]]]:
    """(hostname, address) per rank from each `ranks: ...` line rank 0 prints: one per start of the job
    (a requeued job may start on other hosts)."""
    lines = [line for line in text.splitlines() if line.startswith("ranks: ")]
    return [[tuple(part.split()[1:]) for part in line[len("ranks: ") :].split(", ")] for line in lines]


def ranks_line(text: str) -> list[tuple[str, str]]:
    """(hostname, address) per rank of the job's first start."""
    return ranks_lines(text)[0]


def sbatch_train(data: dict[str, Path], out: Path, settings: dict[str, object]) -> tuple[str, Path]:
    """`sbatch --nodes=2 launch/train.sbatch` (one rank per node) training into `out`: (job id, log)."""
    log = out.with_suffix(".out")
    env = {**os.environ, "AUTOSAM2_PROCS_PER_NODE": "1", "AUTOSAM2_PYTHON": sys.executable}
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}"]
    cmd += [str(REPO / "launch" / "train.sbatch"), *train_overrides(data, out, **settings)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0], log


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def test_hosts_have_their_own_names_and_addresses_and_a_crashed_cluster_is_cleaned_up_by_start(slurm_hosts):
    for host, address in [
        *ADDRESSES.items(),
        SPARE,
    ]:  # resolvable from here (and, the same file, from the hosts)
        assert (
            subprocess.run(["getent", "hosts", host], capture_output=True, text=True).stdout.split()[0]
            == address
        )
    srun = ["srun", "-N3", "-n3", "-l", "bash", "-c", "echo $(hostname) $(hostname -I)"]
    out = subprocess.run(srun, capture_output=True, text=True, timeout=60).stdout
    assert sorted(line.split(": ", 1)[1].strip() for line in out.splitlines()) == [
        f"{h} {a}" for h, a in HOSTS.items()
    ]

    for pidfile in (slurm_hosts / "run").glob("slurm*.pid"):  # a crash: every daemon gone at once
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    restarted = subprocess.run(
        ["bash", str(SCRIPT), "start", "--hosts", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AUTOSAM2_SLURM_DIR": str(slurm_hosts)},
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(re.findall(r"as2-node\d+", namespaces)) == ["as2-node1", "as2-node2", "as2-node3"]
    assert Path("/etc/hosts").read_text().count("# autosam2-test-hosts") == 3
    out = subprocess.run(srun, capture_output=True, text=True, timeout=60).stdout
    assert len(out.splitlines()) == 3


def test_a_second_hosts_cluster_is_refused_in_one_line_and_its_stop_leaves_the_first_alone(
    slurm_hosts, tmp_path
):
    """The bridge and namespaces are one machine's: `start --hosts` from another state folder fails in one
    line naming them, and `stop --hosts` from there removes nothing of the running cluster's."""
    env = {**os.environ, "AUTOSAM2_SLURM_DIR": str(tmp_path / "other")}
    refused = subprocess.run(
        ["bash", str(SCRIPT), "start", "--hosts", "2"], capture_output=True, text=True, timeout=120, env=env
    )
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "the bridge as2br0 or namespaces as2-node* exist" in refused.stderr
    stopped = subprocess.run(
        ["bash", str(SCRIPT), "stop", "--hosts", "2"], capture_output=True, text=True, timeout=120, env=env
    )
    assert stopped.returncode == 0, stopped.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(re.findall(r"as2-node\d+", namespaces)) == ["as2-node1", "as2-node2", "as2-node3"]
    srun = ["srun", "-N3", "-n3", "hostname"]
    assert len(subprocess.run(srun, capture_output=True, text=True, timeout=60).stdout.splitlines()) == 3


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


LAUNCHER_STARTUP = ["queue", "spawn", "imports", "rendezvous", "build", "resume", "first_batch", "first_step"]


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
        hosts = ranks_line(log)  # each rank on a test host, by that host's own address
        assert len(hosts) == 2 and all(HOSTS[h] == a for h, a in hosts), log[-2000:]
        assert len(set(hosts)) == (2 if name == "two_nodes" else 1)
        # the start-up timeline from sbatch on: srun starts the ranks itself (no torchrun: no launch phase)
        startup = [line.split()[1] for line in log.splitlines() if line.startswith("startup: ")]
        assert startup == [*LAUNCHER_STARTUP, "total"], log[-3000:]
        assert "from sbatch to every rank's first step" in log
        client, (run,) = runs_of(tmp_path / name)  # ONE run
        assert run.data.tags["world_size"] == "2"
        assert run.data.tags["hosts"] == ",".join(dict.fromkeys(h for h, _ in hosts))
    # the same global batch, the same ranks and threads: the host boundary changes nothing
    assert max_difference(final_weights(tmp_path / "two_nodes"), final_weights(tmp_path / "one_node")) == 0.0


def test_a_host_that_drops_off_the_network_stops_the_other_in_bounded_time_and_the_run_resumes(
    slurm_hosts, train_data, tmp_path
):
    import threading
    import time

    timeout_s = 20  # above rank 0's start-up work before the first collective (a new MLflow store)
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
    """Three jobs of two nodes each at once: one runs through; one gets the time-limit signal (USR2 to
    its batch shell, on its first host only); one is requeued by `scontrol requeue` (SIGTERM to every
    task on both hosts, SIGKILL KillWait = 30 s later)."""
    # at about a step a second, 14 steps after the step 2 both jobs wait for: the signals land mid-run
    # however far the first job has gone on while the second reached its step 2
    settings = {"train.max_steps": 16, "train.checkpoint_every": 100, "train.validate_every": 100}
    jobs = {
        name: sbatch_train(train_data, tmp_path / name, settings) for name in ("whole", "usr2", "requeue")
    }
    for name in ("usr2", "requeue"):
        wait_for_line(jobs[name][1], "step 2/16")
    subprocess.run(["scancel", "--batch", "--signal=USR2", jobs["usr2"][0]], check=True)
    subprocess.run(["scontrol", "requeue", jobs["requeue"][0]], check=True)
    for _, log in jobs.values():
        wait_for_line(log, "done: 16 steps", timeout=600)
    assert "stopped by signal" not in jobs["whole"][1].read_text()  # other jobs on the same hosts ran on
    for name in ("usr2", "requeue"):
        text = jobs[name][1].read_text()
        assert text.count("stopped by signal at step") == 1, text[-3000:]  # both hosts, one step
        assert text.count("caught SIGUSR2") == (name == "usr2")
        # requeued from outside, SLURM kills the steps and says so; the job that requeues itself
        # after USR2 may see that line too (its own batch shell, still exiting) or not
        assert "DUE TO JOB REQUEUE" in text or name == "usr2"
        assert "resumed from" in text
        starts = ranks_lines(text)  # each start: two different hosts, each by its own address
        assert len(starts) == 2, text[-3000:]
        for hosts in starts:
            assert len({address for _, address in hosts}) == 2 and all(
                a.startswith("10.231.0.") for _, a in hosts
            )
        worst = max_difference(final_weights(tmp_path / "whole"), final_weights(tmp_path / name))
        assert worst <= 1e-6, (name, worst)
        client, (run,) = runs_of(tmp_path / name)  # one run
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")]
        assert steps == list(range(1, 17)), (name, steps)
        # the tag names the hosts of the start that finished (SLURM may requeue the job onto others)
        assert set(run.data.tags["hosts"].split(",")) == {host for host, _ in starts[-1]}


def test_a_shard_array_over_both_hosts_writes_one_set_to_the_shared_folder(slurm_hosts, train_data, tmp_path):
    from shards.verify import verify

    out = tmp_path / "shards" / "train"
    args = ["shard", "--cluster", "slurm", "--num-shards", "4", "--cpus-per-task", "8", "--time", "10", "--"]
    args += [str(train_data["root"]), "--split", "train", "--out", str(out), "--frames-per-sample", "4"]
    jobs = submit([*args, "--max-shard-mb", "0.0001", "--workers", "1"])
    assert all(job.result() == 0 for job in jobs)  # the array's parts, then the merge
    assert verify(out) == []
    # a task takes a whole host (8 CPUs), so the parts ran on several
    array_id = jobs[0].job_id.split("_")[0]
    nodes = subprocess.run(
        ["sacct", "-n", "-X", "-j", array_id, "-o", "NodeList%20"], capture_output=True, text=True
    )
    assert len({line.strip() for line in nodes.stdout.splitlines() if line.strip()}) >= 2, nodes.stdout


def _job_ranks(job_id: str, host: str | None = None, rank: int | None = None) -> list[int]:
    """The training ranks of SLURM job `job_id` (on `host`, of SLURM rank `rank`; not their torchrun),
    read from their environment: `autosam2 train` under srun or torchrun, or the launcher's submitit task."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = proc.info["environ"] or {}
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        task = "-m autosam2.cli train" in cmdline or "-m submitit.core._submit" in cmdline
        if not task or "torch.distributed.run" in cmdline or env.get("SLURM_JOB_ID") != job_id:
            continue
        if host in (None, env.get("SLURMD_NODENAME")) and rank in (None, int(env.get("SLURM_PROCID", -1))):
            found.append(proc.pid)
    return found


def test_a_host_that_dies_under_slurm_stops_the_survivor_and_the_requeued_job_resumes(
    slurm_hosts, train_data, tmp_path
):
    import time

    timeout_s = 20  # above rank 0's start-up work before the first collective (a new MLflow store)
    out = tmp_path / "run"
    settings = {
        "train.max_steps": 4,
        "train.checkpoint_every": 1,
        "train.validate_every": 100,
        "train.dist_timeout_s": timeout_s,
    }
    job_id, log = sbatch_train(train_data, out, settings)
    wait_for_line(log, "step 2/4")
    (first, first_address), (lost, lost_address) = ranks_line(log.read_text())
    spare = next(h for h in ["node1", "node2", "node3"] if h not in (first, lost))
    survivors = _job_ranks(job_id, first)
    assert survivors and _job_ranks(job_id, lost)
    # a host dies: every process of it at once (its slurmd, the job's step daemon, its rank)
    pids = subprocess.run(
        ["ip", "netns", "pids", f"as2-{lost}"], capture_output=True, text=True
    ).stdout.split()
    died = time.monotonic()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    conf = slurm_hosts / "slurm.conf"
    try:
        while any(psutil_alive(pid) for pid in survivors):
            assert time.monotonic() - died < timeout_s + 30, f"the rank on {first} did not exit"
            time.sleep(0.1)
        exited = time.monotonic() - died
        print(f"the rank on {first} exited {exited:.1f} s after {lost} died (timeout {timeout_s} s)")
        assert f"the other ranks: 1 on {lost} ({lost_address})" in log.read_text()  # it names the lost host
        checkpoints = out / "checkpoints"
        assert not [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]  # nothing half-written
        latest = (checkpoints / "latest").read_text().strip()
        assert (checkpoints / latest / "state.json").exists()
        # SLURM declares the host down (SlurmdTimeout) and queues the job again: it runs without it
        wait_for_line(log, "done: 4 steps", timeout=400)
    finally:  # the host comes back for the tests after this one
        subprocess.run(on_host(lost, ["slurmd", "-N", lost, "-f", str(conf)]), check=True)
    text = log.read_text()
    assert f"resumed from {checkpoints / latest} at step {int(latest.split('_')[1])}" in text, text[-3000:]
    resumed = text.split("resumed from")[0].rsplit("ranks: ", 1)[1]  # the requeued job's ranks
    assert lost not in {host for host, _ in ranks_line("ranks: " + resumed)}
    assert spare in {host for host, _ in ranks_line("ranks: " + resumed)}
    client, (run,) = runs_of(out)  # one run
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")]
    assert sorted(set(logged)) == [1, 2, 3, 4]


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_evaluation_on_two_hosts_splits_the_sequences_and_equals_one_rank(slurm_hosts, train_data, tmp_path):
    import json

    from autosam2.config import load_config
    from autosam2.model.sam2_builder import build_autosam2
    from autosam2.model.weights import RunWeights

    cfg = load_config(None, ["model.image_size=128"])
    RunWeights(tmp_path, build_autosam2(cfg.model, torch.device("cpu")), cfg.model, True).save("w.pt", 0)
    results, jobs = {}, {}
    for name, layout in (("two_hosts", ["--nodes", "2"]), ("one_rank", ["--nodes", "1"])):  # both at once
        launch = ["--cluster", "slurm", *layout, "--tasks-per-node", "1", "--cpus-per-task", "1"]
        args = ["--weights", str(tmp_path / "w.pt"), "--data", str(train_data["valid"]), "--cpu"]
        (jobs[name],) = submit(
            ["evaluate", *launch, "--time", "30", "--", *args, "--output-dir", str(tmp_path / name)]
        )
    for name, job in jobs.items():
        assert job.results()[0] == 0, name
        log = (tmp_path / f"{name}.jobs" / job.job_id / f"{job.job_id}_0_log.out").read_text()
        results[name] = (json.loads((tmp_path / name / "metrics.json").read_text()), log)
    (two, two_log), (one, one_log) = results["two_hosts"], results["one_rank"]
    hosts = ranks_line(two_log)
    assert len(set(hosts)) == 2 and all(HOSTS[h] == a for h, a in hosts) and len(ranks_line(one_log)) == 1
    assert "2 sequences over 2 rank(s)" in two_log  # one sequence each, gathered once on rank 0
    assert (
        two["ranks"] == 2 and two["summary"] == one["summary"] and two["per_sequence"] == one["per_sequence"]
    )
    for mask in (tmp_path / "one_rank" / "masks").rglob("*.png"):  # both hosts wrote into the one folder
        assert (
            tmp_path / "two_hosts" / mask.relative_to(tmp_path / "one_rank")
        ).read_bytes() == mask.read_bytes()
    client, (run,) = runs_of(tmp_path / "two_hosts", f"sqlite:///{tmp_path}/mlflow.db")
    assert run.data.params["ranks"] == "2"


def _torchrun_on_both(
    out: Path, data: dict[str, Path], settings: dict[str, object]
) -> list[subprocess.Popen]:
    """`autosam2 train` under torchrun on node1 (rank 0, the rendezvous) and node2 (rank 1)."""
    port = str(free_port())
    procs = []
    for rank, host in enumerate(ADDRESSES):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        torchrun += ["--node-rank", str(rank), "--master-addr", "node1", "--master-port", port]
        train = ["-m", "autosam2.cli", "train", *train_overrides(data, out, **settings)]
        procs.append(
            subprocess.Popen(
                on_host(host, [*torchrun, *train]),
                cwd=REPO,
                env={**ENV, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _link_bytes(host: str) -> int:
    """Bytes through `host`'s link so far, both ways: its interface's counters, read inside its
    namespace (`ip netns exec` mounts that namespace's /sys)."""
    counters = [f"/sys/class/net/eth0/statistics/{way}_bytes" for way in ("tx", "rx")]
    read = ["ip", "netns", "exec", f"as2-{host}", "cat", *counters]
    return sum(
        int(n) for n in subprocess.run(read, capture_output=True, text=True, check=True).stdout.split()
    )


def test_bf16_gradient_compression_halves_the_bytes_a_step_puts_on_a_hosts_link(
    slurm_hosts, train_data, tmp_path
):
    """Per step: the difference between a 5-step and a 1-step job over two hosts, so start-up (DDP's
    broadcast of the whole model, the rendezvous) cancels; with fp32 and with bf16 gradients."""
    per_step = {}
    for compression in ("none", "bf16"):
        moved = {}
        for steps in (1, 5):
            settings = {
                "train.max_steps": steps,
                "train.validate_every": 100,
                "train.checkpoint_every": 100,
                "tracking.enabled": "false",
                "train.grad_compression": compression,
            }
            before = _link_bytes("node2")
            procs = _torchrun_on_both(tmp_path / f"{compression}_{steps}", train_data, settings)
            outputs = [proc.communicate(timeout=300)[0] for proc in procs]
            assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
            moved[steps] = _link_bytes("node2") - before
        per_step[compression] = (moved[5] - moved[1]) / 4
    ratio = per_step["bf16"] / per_step["none"]
    print(
        f"bytes per step through node2's link (tx + rx): fp32 {per_step['none']:.0f}, "
        f"bf16 {per_step['bf16']:.0f}, ratio {ratio:.3f}"
    )
    # two ranks: each sends and receives its fp32 gradients' bytes once per step (19.5 MB here)
    assert per_step["none"] > 2 * 4 * 4.8e6 * 0.9
    assert ratio <= 0.55


@pytest.mark.parametrize("peer_timeout_s", [10, None])  # None: the default (60 s)
def test_the_survivor_of_a_host_cut_off_exits_within_peer_timeout_s_with_one_line(
    slurm_hosts, train_data, tmp_path, peer_timeout_s
):
    """node2's link goes down at step 2, with the collective timeout at its default (600 s): the rank
    on node1 exits within train.peer_timeout_s (and a beat) naming node2, and the cut-off rank exits
    too, naming the rendezvous it lost, instead of waiting to rejoin."""
    import threading
    import time

    from autosam2.config import TrainConfig

    bound = peer_timeout_s or TrainConfig().peer_timeout_s
    settings = {"train.max_steps": 2000, "train.validate_every": 10000, "tracking.enabled": "false"}
    if peer_timeout_s is not None:
        settings["train.peer_timeout_s"] = peer_timeout_s
    survivor, lost = _torchrun_on_both(tmp_path / "run", train_data, settings)
    lines, down_at = [], []

    def read() -> None:
        for line in survivor.stdout:
            lines.append(line)
            if line.startswith("step 2/") and not down_at:
                subprocess.run(["ip", "link", "set", "as2v2", "down"], check=True)
                down_at.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert survivor.wait(timeout=bound + 240) != 0
        exited = time.monotonic() - down_at[0]
        lost_status = lost.wait(timeout=bound + 60)  # it exits while its link is still down
        reader.join(10)
    finally:
        subprocess.run(["ip", "link", "set", "as2v2", "up"], check=True)
        lost.kill()
        lost.wait(60)
    text, lost_text = "".join(lines), lost.stdout.read()
    assert (
        f"rank 0: rank 1 on node2 (10.231.0.2) gave no sign of life for {bound} s "
        f"(train.peer_timeout_s={bound})"
    ) in text, text[-3000:]
    assert exited <= bound + 20, exited
    assert lost_status != 0
    # the cut-off rank leaves on its own too: it loses the rendezvous store, or its watch finds rank 0 silent
    lost_lines = (
        "rank 1: the rendezvous store at node1:",
        "rank 1: rank 0 on node1 (10.231.0.1) gave no sign",
    )
    assert any(line in lost_text for line in lost_lines), lost_text[-3000:]
    print(f"survivor exited {exited:.1f} s after node2's link went down (peer_timeout_s {bound})")


def _torch_store_warning(line: str) -> bool:
    """A line of torch's own C++ log (a warning or an error, with or without its rank) about a rendezvous
    store connection that dropped, or of the backtrace it prints after."""
    if re.match(r"(\[rank\d+\]:)?\[[WE]\d{4} [^]]*\] \[c10d\]", line):
        return True
    return not line.strip() or line.startswith(
        ("Exception raised from ", "frame #", "<omitting python frames>")
    )


def test_a_rank_cut_off_by_the_network_never_writes_into_the_run_after_its_job_ended(
    slurm_hosts, train_data, tmp_path
):
    """Held-out case: a two-node job's second host loses its link; SLURM requeues the job, which
    finishes on the other hosts. The cut-off rank (its watch and collectives set long, so it is still
    alive when the link comes back) finds its incarnation fenced: one line, exit, and the finished
    job's result files and checkpoints stay as the job left them."""
    import pickle
    import time

    out = tmp_path / "run"
    settings = {
        "train.max_steps": 8,
        "train.checkpoint_every": 1,
        "train.validate_every": 100,
        "train.peer_timeout_s": 900,
        "tracking.enabled": "false",
    }
    launch = ["train", "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "2"]
    (job,) = submit([*launch, "--time", "30", "--", *train_overrides(train_data, out, **settings)])
    log = out / "jobs" / job.job_id / f"{job.job_id}_0_log.out"
    wait_for_line(log, "step 2/8")
    (_, _), (lost, _) = ranks_line(log.read_text())
    link = f"as2v{lost[-1]}"
    subprocess.run(["ip", "link", "set", link, "down"], check=True)  # at once: 6 steps before the job's end
    try:
        old_ranks = _job_ranks(job.job_id, lost)
        assert old_ranks
        wait_for_line(log, "done: 8 steps", timeout=600)  # requeued, finished on the other hosts
        assert restarts(job.job_id) == 1, "the job ended before its link was cut"
        job.results()  # submitit writes the result files after the run's last line: wait for the job's end
        results = sorted((out / "jobs" / job.job_id).glob("*_result.pkl"))
        assert results
        before = {p: p.read_bytes() for p in results}
        checkpoints = {p: p.stat().st_mtime for p in (out / "checkpoints").rglob("*") if p.is_file()}
        lost_log = out / "jobs" / job.job_id / f"{job.job_id}_1_log.err"
        size = lost_log.stat().st_size if lost_log.exists() else 0
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    deadline = time.monotonic() + 300
    while any(psutil_alive(pid) for pid in old_ranks) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(psutil_alive(pid) for pid in old_ranks), "the cut-off rank is still alive"
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was written after the job ended"
        assert pickle.loads(data)[0] == "success", path
    assert {p: p.stat().st_mtime for p in (out / "checkpoints").rglob("*") if p.is_file()} == checkpoints
    if lost_log.exists():
        # the rank leaves by the fence (its one line) or is killed by SLURM once its host is back (submitit
        # says which signal it passes over); torch's C++ warning about the lost store may come first
        with lost_log.open("rb") as f:
            added = f.read()[size:].decode(errors="replace").strip().splitlines()
        assert not any("Traceback" in line for line in added), added
        fenced = [line for line in added if "not writing" in line]
        assert len(fenced) <= 1, fenced
        unknown = [
            line
            for line in added
            if not (_torch_store_warning(line) or line in fenced or "Bypassing signal" in line)
        ]
        assert not unknown, unknown
    assert _final_state(job.job_id) == "COMPLETED"


def _final_state(job_id: str, timeout: float = 120) -> str:
    """The job's state in SLURM's accounting once it has ended (slurmdbd records it a moment later)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        sacct = ["sacct", "-n", "-X", "-j", job_id, "-o", "State"]
        state = (subprocess.run(sacct, capture_output=True, text=True).stdout.split() or ["?"])[-1]
        if state not in {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "?"} or time.monotonic() > deadline:
            return state
        time.sleep(1)


def test_a_second_submission_into_one_directory_is_refused_while_the_first_job_lives(
    slurm_hosts, train_data, tmp_path, capsys
):
    """Two submissions into one output directory seconds apart: the second is refused in one line
    naming the first job (pending or running), before any rank takes the run lock; once the first job
    is done its reservation is gone and a new submission goes through."""
    from launch.__main__ import main

    out = tmp_path / "run"
    settings = {"train.max_steps": 3, "train.validate_every": 100, "tracking.enabled": "false"}
    launch = ["train", "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "2"]
    args = [*launch, "--time", "30", "--", *train_overrides(train_data, out, **settings)]
    (first,) = submit(args)
    capsys.readouterr()
    assert main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"launch: {out}: reserved by job {first.job_id} (slurm), submitted from "), line
    assert "pending or running" in line
    assert first.results()[0]["step"] == 3
    jobs = sorted(p.name for p in (out / "jobs").iterdir() if not p.name.startswith("."))  # submitit's links
    assert jobs == [first.job_id]  # no second job
    assert not (out / "run.reserved").exists()
    (again,) = submit([*args, "train.max_steps=4"])
    assert again.results()[0]["step"] == 4


def test_scontrol_requeue_requeues_a_launcher_job_once_without_a_traceback(slurm_hosts, train_data, tmp_path):
    """`scontrol requeue` of a launcher job on two hosts: SLURM sends SIGTERM to both ranks and requeues
    the job itself. The run checkpoints, leaves without asking for a second requeue, its log names
    SIGTERM, and the requeued run ends with the weights of an uninterrupted one."""
    settings = {"train.max_steps": 6, "train.checkpoint_every": 100, "train.validate_every": 100}
    runs = {
        name: submit(["train", *LAUNCH_2, "--", *train_overrides(train_data, tmp_path / name, **settings)])[0]
        for name in ("whole", "parted")
    }
    parted = runs["parted"]
    folder = tmp_path / "parted" / "jobs" / parted.job_id
    log = folder / f"{parted.job_id}_0_log.out"
    wait_for_line(log, "step 2/6")
    subprocess.run(["scontrol", "requeue", parted.job_id], check=True, timeout=60)
    wait_for_line(log, "done: 6 steps", timeout=600)  # the requeued run's end
    result = parted.results()[0]
    assert result["step"] == 6 and not result["stopped"]
    assert runs["whole"].results()[0]["step"] == 6
    logs = "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.*")))
    assert "Traceback" not in logs and "pending execution" not in logs, logs[-3000:]
    assert "SIGTERM: stopping at the next step boundary" in logs, logs[-3000:]  # said as it came
    assert "SIGUSR2" not in logs and "requeueing job" not in logs
    assert log.read_text().count("Starting with JobEnvironment") == 2  # the first run, the one requeue
    assert restarts(parted.job_id) == 1
    assert "resumed from" in log.read_text()
    assert len({address for _, address in ranks_line(log.read_text())}) == 2  # two hosts
    assert max_difference(final_weights(tmp_path / "whole"), final_weights(tmp_path / "parted")) <= 1e-6


def test_a_rank_killed_under_max_failures_1_is_requeued_once_and_completes(slurm_hosts, train_data, tmp_path):
    """The rank on the second host killed with SIGKILL (the OOM killer's way: no handler runs; srun ends
    the other): the job script requeues the job once (--max-failures 1), the run resumes from its step-2
    checkpoint and ends with the weights of an uninterrupted run."""
    settings = {"train.max_steps": 6, "train.checkpoint_every": 2, "train.validate_every": 100}
    (whole,) = submit(
        ["train", *LAUNCH_2, "--", *train_overrides(train_data, tmp_path / "whole", **settings)]
    )
    launch = ["train", *LAUNCH_2, "--max-failures", "1", "--"]
    (job,) = submit([*launch, *train_overrides(train_data, tmp_path / "killed", **settings)])
    folder = tmp_path / "killed" / "jobs" / job.job_id
    log = folder / f"{job.job_id}_0_log.out"
    wait_for_line(log, "step 3/6")  # past the checkpoint of step 2
    os.kill(_task_pid(job.job_id, 1), signal.SIGKILL)
    wait_for_line(log, "done: 6 steps", timeout=600)
    result = job.results()[0]
    assert result["step"] == 6 and not result["stopped"]
    assert whole.results()[0]["step"] == 6
    err = (folder / f"{job.job_id}_0_log.err").read_text(errors="replace")  # the job script's too
    head = f"autosam2: job {job.job_id}: a rank failed (srun's exit status "
    (line,) = [x for x in err.splitlines() if x.startswith(head)]
    assert line.endswith("; requeueing it (1 of 1): it resumes from its last checkpoint"), line
    assert (folder / "failure_requeues").read_text() == "1\n"
    assert restarts(job.job_id) == 1
    assert "resumed from" in log.read_text()
    assert max_difference(final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")) <= 1e-6


def _task_pid(job_id: str, rank: int, timeout: float = 120) -> int:
    """The pid of task `rank` of a launcher job, once it runs."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _job_ranks(job_id, rank=rank)
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no task {rank} of job {job_id} found")
