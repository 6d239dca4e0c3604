"""The one mapping of a job step's variables to torch.distributed's; the process group's settings and timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autosam2.engine.dist import map_slurm_env
from tests.helpers import TORCHRUN_2

REPO = Path(__file__).resolve().parents[1]


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
    assert env["LOCAL_WORLD_SIZE"] == "4"  # SLURM_NNODES unset: one node
    assert env["MASTER_PORT"] == str(20000 + 1234) and env["MASTER_ADDR"] in ("gpu07", "gpu")
    torchrun = {"RANK": "0", "SLURM_PROCID": "5"}
    map_slurm_env(torchrun)
    assert torchrun == {"RANK": "0", "SLURM_PROCID": "5"}  # torchrun's own variables win


def test_submitit_local_tasks_become_torchrun_variables():
    # `python -m launch --cluster local`: the tasks are processes of this host
    env = {
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_JOB_ID": "4321",
    }
    map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "1",
        "2",
        "1",
        "2",
    )
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(20000 + 4321))
    alone = {"PATH": "/bin"}
    map_slurm_env(alone)
    assert alone == {"PATH": "/bin"}  # neither a job step nor torchrun: nothing to map


def test_one_thread_rule_whatever_the_launcher():
    from autosam2.engine.dist import torch_threads

    cores = len(os.sched_getaffinity(0))
    srun = {"SLURM_CPUS_PER_TASK": "4", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    assert torch_threads(None, srun) == (4, "SLURM_CPUS_PER_TASK=4")  # one rank per task: its CPUs
    inside = {**srun, "TORCHELASTIC_RUN_ID": "x"}  # torchrun in a task: its ranks share the task's CPUs
    assert torch_threads(None, inside) == (2, "SLURM_CPUS_PER_TASK=4 over 2 torchrun ranks")
    assert torch_threads(None, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) == (3, "OMP_NUM_THREADS=3")
    assert torch_threads(None, {})[0] == cores
    assert torch_threads(None, {"LOCAL_WORLD_SIZE": str(2 * cores)})[0] == 1  # never 0
    assert torch_threads(5, srun) == (5, "train.threads")  # the config wins


def test_backend_settings_follow_the_config():
    import torch

    from autosam2.engine.dist import configure_backends

    try:
        assert configure_backends(cudnn_benchmark=False, tf32=False)["cuda_matmul_fp32"] == "ieee"
        assert not torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
        configure_backends(cudnn_benchmark=True, tf32=True)
        assert torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        configure_backends(cudnn_benchmark=False, tf32=False)


def test_a_process_group_of_one_wraps_ddp_and_is_gone_afterwards(monkeypatch):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from autosam2.config import OptimConfig
    from autosam2.engine.dist import single_process_group
    from autosam2.engine.engines import DDPEngine
    from tests.helpers import TinyModel, batch

    monkeypatch.delenv("RANK", raising=False)
    with single_process_group(torch.device("cpu")) as info:
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo" and os.environ["RANK"] == "0"
        engine = DDPEngine(TinyModel(), OptimConfig(), 4, info)
        assert isinstance(engine.wrapped, DistributedDataParallel)  # the reducer runs as in a job
        out = engine.forward(batch().images_TBCHW.float(), per_frame=False)
        engine.backward(out.mask_logits_TBHW.mean())
        assert engine.step() is not None
    assert not dist.is_initialized() and "RANK" not in os.environ


HUNG_RANK = """
import sys, time, torch
import torch.distributed as dist
from autosam2.engine.dist import distributed
with distributed("cpu", timeout_s=int(sys.argv[1])) as info:
    if info.rank == 1:
        time.sleep(120)  # alive but silent: a hung GPU, a stuck filesystem
    print("rank 0 waits", flush=True)
    dist.all_reduce(torch.ones(1))
"""


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_within_dist_timeout_s(tmp_path):
    script = tmp_path / "hung.py"
    script.write_text(HUNG_RANK)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*TORCHRUN_2, str(script), "5"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, waited, elapsed = [], None, None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("rank 0 waits"):
            waited = time.monotonic()
        if "RankLost" in line and waited is not None and elapsed is None:
            elapsed = time.monotonic() - waited
    assert proc.wait(timeout=120) != 0
    text = "".join(lines)
    assert "rank 0: no answer from another rank within train.dist_timeout_s=5 s" in text, text[-3000:]
    assert elapsed is not None and 4 <= elapsed <= 30, (
        elapsed
    )  # the 5 s timeout, not torch's 30-minute default


FAILING_RANK = """
import torch
import torch.distributed as dist
from autosam2.engine.dist import distributed
with distributed("cpu", timeout_s=60) as info:
    if info.rank == 1:
        raise ValueError("shard train-007.tar is cut at sample seq9__00002")
    dist.all_reduce(torch.ones(1))
"""


def test_a_rank_that_only_sees_another_go_names_that_ranks_error(tmp_path):
    """Rank 1 stops on its own error; rank 0, waiting in a collective, says which error stopped it (the
    failing rank leaves its first line in the group's store), so a job whose first failing task is rank
    0 still shows the cause."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*TORCHRUN_2, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    lost = [line for line in (done.stdout + done.stderr).splitlines() if "RankLost: rank 0" in line]
    assert lost, (done.stdout + done.stderr)[-3000:]
    assert (
        "another rank stopped, so this one stops too (rank 1: shard train-007.tar is cut at sample seq9__00002"
        in lost[0]
    )


def test_the_port_command_prints_the_jobs_port_and_refuses_a_job_id_that_is_not_one(capsys):
    from autosam2.engine.dist.__main__ import main
    from autosam2.engine.dist.slurm import job_port

    assert main(["port", "54321"]) == 0 and capsys.readouterr().out.strip() == str(job_port(54321))
    with pytest.raises(SystemExit) as refused:
        main(["port", "abc"])
    assert refused.value.code == 2 and "'abc' is not a whole number" in capsys.readouterr().err


SILENT_PEER = """
import os, sys, time, torch
import torch.distributed as dist
from autosam2.engine.dist import distributed
with distributed("cpu", timeout_s=600, peer_timeout_s=int(sys.argv[1])) as info:
    dist.barrier()
    print(f"rank {info.rank} waits", flush=True)
    if info.rank == int(sys.argv[2]):
        time.sleep(600)  # alive (its watch beats) until the test stops it
    dist.all_reduce(torch.ones(1))  # the rank that is stopped never joins it
"""


@pytest.mark.slow
@pytest.mark.parametrize("stopped", [0, 1])  # 0 holds the rendezvous store, as under srun
def test_a_stopped_peer_ends_the_rank_watching_it_within_peer_timeout_s(tmp_path, stopped):
    """Two ranks as srun starts them; one is stopped (SIGSTOP: a host cut off answers nothing either).
    The other, waiting in a collective with a 600 s timeout, exits within train.peer_timeout_s (3 s
    here) with one line naming what went silent and the bound."""
    import signal

    from autosam2.engine.dist import job_port

    script = tmp_path / "silent.py"
    script.write_text(SILENT_PEER)
    port = str(job_port(os.getpid() % 20000 + 20000))
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), "3", str(stopped)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        for proc in procs:
            assert proc.stdout.readline().endswith("waits\n")
        procs[stopped].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        survivor = procs[1 - stopped]
        status = survivor.wait(timeout=60)
        elapsed = time.monotonic() - start
        text = survivor.stdout.read()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert status == 1
    what = (
        "the rendezvous store at 127.0.0.1:" + port + " (rank 0's host) gave no answer for 3 s"
        if stopped == 0
        else "rank 1 gave no sign of life for 3 s"
    )
    assert (
        f"rank {1 - stopped}: {what} (train.peer_timeout_s=3): its process is stopped or its host is "
        "unreachable, so this rank exits"
    ) in text, text
    assert 2 <= elapsed <= 20, elapsed  # the bound and a beat, not the collective's 600 s


def test_under_the_default_settings_a_silent_peer_is_one_line_after_60_s(monkeypatch, capsys):
    """The default bound (train.peer_timeout_s) holds whatever dist_timeout_s is: the watch's judge,
    fed a peer silent past it, says so in one line and ends the process."""
    from autosam2.config import TrainConfig
    from autosam2.engine.dist import peers, watchdog

    assert watchdog.PEER_TIMEOUT_S == TrainConfig().peer_timeout_s == 60 < TrainConfig().dist_timeout_s
    monkeypatch.setattr(peers, "_RANK_HOSTS", [("node1", "10.0.0.1"), ("node2", "10.0.0.2")])
    watch = watchdog.PeerWatch(0, 2, watchdog.PEER_TIMEOUT_S, ("10.0.0.1", 21234))
    assert watch.watched == [1] and watch.beat_s == 5.0
    watch.beat_s = 0.01
    watch._contact = time.monotonic()
    watch._seen[1] = (4, time.monotonic() - 61)

    def exit_(status):
        raise SystemExit(status)

    monkeypatch.setattr(watchdog.os, "_exit", exit_)
    with pytest.raises(SystemExit) as ended:
        watch._judge()
    assert ended.value.code == 1
    assert capsys.readouterr().err == (
        "rank 0: rank 1 on node2 (10.0.0.2) gave no sign of life for 60 s (train.peer_timeout_s=60): its "
        "process is stopped or its host is unreachable, so this rank exits\n"
    )


EXIT_WHILE_WATCHING = """
import datetime, sys, torch.distributed as dist
from autosam2.engine.dist.watchdog import PeerWatch
server = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
watch = PeerWatch(1, 2, 60, ("127.0.0.1", server.port))
watch.beat_s = 0.0  # beats back to back: the watch thread is inside a store call nearly all the time
watch._judge = lambda: None
watch.start()
import time; time.sleep(0.3)
if sys.argv[1] == "stop":
    watch.stop()
    assert not watch._thread.is_alive()
    assert server.check(["autosam2/peers/0/bye/rank1"])
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["stop", "main thread ends"])
def test_a_process_ends_cleanly_while_its_watch_talks_to_the_store(tmp_path, how):
    """A rank that ends while its PeerWatch is inside a store call exits with its own status: it is not
    aborted by torch's bindings ("terminate called without an active exception", SIGABRT) when the
    interpreter shuts down, whether the watch was stopped or the main thread just ended."""
    script = tmp_path / "watching.py"
    script.write_text(EXIT_WHILE_WATCHING)
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(script), how.split()[0]],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "done\n"), done.stderr[-2000:]
        assert "terminate called" not in done.stderr
