"""Failure paths of real runs, with loader workers at their default count: every error ends the process
within seconds and leaves no process behind; a full disk, a killed launcher, Ctrl-C, a second run into
the same directory and bad inputs each end in one line, and no checkpoint is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from autosam2.cli import main as cli
from autosam2.config import load_config
from tests.helpers import TORCHRUN_2, runs_of, train_overrides, truncate

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
TRAIN = [sys.executable, "-m", "autosam2.cli", "train"]
PACKAGE = Path(__import__("autosam2").__file__).parent
EXIT_BOUND_S = 15  # from the error's message to the end of every process of the run


class Run:
    """A process started in its own session; its output lines are kept with the time each arrived."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str, str]] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, name), daemon=True)
            for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), name, line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, _, line in list(self.lines):
                if text in line:
                    return when
            if self.proc.poll() is not None and not any(r.is_alive() for r in self.readers):
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never came: {self.output()[-3000:]}")

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    def output(self, which: str | None = None) -> str:
        return "\n".join(line for _, name, line in self.lines if which in (None, name))

    def session_alive(self) -> list[psutil.Process]:
        """Processes of this run's session still there (loader workers, ranks)."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.proc.pid:
                    found.append(proc)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    def kill(self) -> None:
        for proc in self.session_alive():
            proc.kill()
        self.proc.kill()
        self.finish()


def assert_ends_cleanly(run: Run, error: str) -> None:
    """The error arrives as one line, then the process and everything it started end within the bound."""
    said = run.wait_for(error)
    try:
        code = run.finish(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError(f"still running 120 s after: {error}") from None
    ended = time.monotonic()
    deadline = time.monotonic() + 10
    while run.session_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert code != 0
    assert ended - said < EXIT_BOUND_S, f"{ended - said:.1f} s from the error to the exit"
    assert run.session_alive() == [], "processes left behind"
    err = run.output("err")
    # no traceback through our code (torchrun prints its own summary of a failed rank)
    assert "autosam2/" not in "".join(
        line for line in err.splitlines() if line.strip().startswith("File ")
    ), err
    if "torch.distributed.run" not in run.proc.args:
        assert "Traceback" not in err, err[-3000:]
    lines = {line for line in err.splitlines() if line.startswith("autosam2 train:")}
    ranks = 2 if "torch.distributed.run" in run.proc.args else 1
    # one line a rank: the error, or (on a rank that did not meet it) that another rank stopped
    assert 1 <= len(lines) <= ranks and any(error in line for line in lines), err


def train_args(data, out: Path, **extra) -> list[str]:
    settings = {"data.num_workers": 2, "train.max_steps": 200, "train.validate_every": 1000, **extra}
    return train_overrides(data, out, **settings)


# loader workers ---------------------------------------------------------------------------------------

HOLD_WORKERS = """
import multiprocessing, sys, time
from autosam2.config import DataConfig
from autosam2.data.stream import ClipStream, make_loader
it = iter(make_loader(ClipStream(sys.argv[1], "train", DataConfig(clip_len=2), 64, seed=0), 2))
next(it)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
if sys.argv[2] == "sleep":
    time.sleep(600)
print("exiting", flush=True)
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def command_line(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_a_process_with_loader_workers_exits(train_data):
    """The minimal case: a loader still running at interpreter exit. Workers ignore SIGTERM (SLURM's
    stop signal is their rank's to act on), which once made the exit wait on them forever."""
    run = Run([sys.executable, "-c", HOLD_WORKERS, str(train_data["train"]), "exit"])
    try:
        code = run.finish(timeout=60)
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError("the process never exited") from None
    assert code == 0 and "exiting" in run.output("out")
    workers = [int(p) for p in run.output("out").splitlines()[0].split()]
    assert len(workers) == 2 and gone(workers)


def test_loader_workers_die_with_a_process_killed_with_9(train_data):
    run = Run([sys.executable, "-c", HOLD_WORKERS, str(train_data["train"]), "sleep"])
    try:
        run.wait_for(" ")
        workers = [int(p) for p in run.output("out").splitlines()[0].split()]
        assert len(workers) == 2
        run.proc.kill()
        run.finish()
        assert gone(workers, timeout=5)
    finally:
        if run.proc.poll() is None:
            run.kill()


# errors during training -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["alone", "torchrun"])
def test_a_broken_shard_ends_the_run_with_workers(train_data, tmp_path, launcher):
    """Under torchrun one shard is broken: the rank that reads it says so, the other that it stopped."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(train_data["train"], shards)
    for shard in sorted(shards.glob("*.tar"))[: 1 if launcher == "torchrun" else None]:
        truncate(shard, 0.5)
    data = {**train_data, "train": shards}
    command = TRAIN if launcher == "alone" else [*TORCHRUN_2, "-m", "autosam2.cli", "train"]
    run = Run([*command, *train_args(data, tmp_path / "out")])
    assert_ends_cleanly(run, "tar is truncated or corrupt")


@pytest.mark.slow
def test_the_non_finite_loss_abort_ends_the_run_with_workers(train_data, tmp_path):
    run = Run(
        [*TRAIN, *train_args(train_data, tmp_path / "out", **{"loss.dice": "nan", "train.max_bad_steps": 2})]
    )
    assert_ends_cleanly(run, "2 non-finite losses in a row")


@pytest.fixture
def small_disk(tmp_path):
    """A 400 MB tmpfs (root), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["alone", "torchrun", "deepspeed"])
def test_a_full_disk_during_a_checkpoint_ends_the_run_and_keeps_the_last_one(
    train_data, tmp_path, small_disk, launcher
):
    """Under torchrun only rank 0's writes fail: the save agrees on the failure, so no rank hangs (with
    DeepSpeed too, whose own save ends in a barrier the failing rank must still meet)."""
    out = small_disk / "run"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the tracking store is not on the full disk
    command = TRAIN if launcher == "alone" else [*TORCHRUN_2, "-m", "autosam2.cli", "train"]
    if launcher == "deepspeed":
        command.append("--engine=deepspeed")
    run = Run([*command, *train_args(train_data, out, **{"tracking.uri": tracking})])
    try:
        deadline = time.monotonic() + 300
        latest = out / "checkpoints" / "latest"
        while not (latest.is_file() and latest.read_text().strip() == "step_00000002"):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.1)
        with open(small_disk / "filler", "wb") as filler:  # fill what is left
            try:
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
            except OSError:
                pass
        assert_ends_cleanly(run, "no space left on device")
    finally:
        if run.proc.poll() is None:
            run.kill()
    line = next(line for line in run.output("err").splitlines() if line.startswith("autosam2 train:"))
    assert f"{out}/checkpoints/step_0000000" in line and "writing checkpoint step_0000000" in line
    assert line.endswith("(partial folder removed); step_00000002 is intact"), line
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002"], names
    assert not (out / "run.lock").exists()
    (small_disk / "filler").unlink()
    from autosam2.engine.checkpoint import Checkpointer

    assert Checkpointer.check(out / "checkpoints" / "step_00000002") is None


@pytest.mark.slow
def test_a_kill_during_an_async_checkpoint_write_leaves_the_previous_one_in_charge(train_data, tmp_path):
    """Fully trainable hiera-t: engine.pt is ~0.3 GB, written on rank 0's background thread. kill -9 while
    step 4's folder is half written: `latest` still names step 2, which loads; the next run resumes
    from it and removes the half-written folder."""
    out = tmp_path / "out"
    trainable = {f"model.freeze.{part}": "false" for part in ("image_encoder", "mask_decoder", "memory")}
    run = Run([*TRAIN, *train_args(train_data, out, **trainable)])
    checkpoints = out / "checkpoints"
    half = checkpoints / "step_00000004.tmp" / "engine.pt"
    try:
        deadline = time.monotonic() + 300
        while not (half.is_file() and half.stat().st_size > 0):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.005)
    finally:
        run.kill()
    run.finish()
    assert half.parent.is_dir() and not (half.parent / "state.json").exists()  # killed mid-write
    assert "checkpoint step_00000002: " in run.output("out") and "in the background" in run.output("out")
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    from autosam2.engine.checkpoint import Checkpointer

    assert Checkpointer.check(checkpoints / "step_00000002", deep=True) is None
    again = Run([*TRAIN, *train_args(train_data, out, **trainable, **{"train.max_steps": 3})])
    assert again.finish(timeout=300) == 0, again.output()[-3000:]
    assert f"resumed from {checkpoints / 'step_00000002'} at step 2" in again.output("out")
    assert not half.parent.exists()
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"


# one run per output directory; ranks die with their launcher ----------------------------------------


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_runs_directory_is_taken_over(train_data, tmp_path):
    out = tmp_path / "out"
    first = Run([*TRAIN, *train_args(train_data, out)])
    try:
        first.wait_for("step 3/200")
        config_before = (out / "config.yaml").stat().st_mtime_ns
        second = Run([*TRAIN, *train_args(train_data, out)])
        assert second.finish(timeout=120) == 1
        err = second.output("err")
        assert f"{out}: in use by another run (pid {first.proc.pid} on " in err and "Traceback" not in err
        assert (out / "config.yaml").stat().st_mtime_ns == config_before
        first.wait_for("step 5/200")
    finally:
        first.kill()  # kill -9: the lock stays behind, its holder gone
    assert (out / "run.lock").exists()
    # the newest checkpoint is damaged too: the next run resumes from the one before, and says so
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    (newest / "state.json").write_text("{not json")
    third = Run([*TRAIN, *train_args(train_data, out, **{"train.max_steps": int(newest.name[5:]) + 1})])
    assert third.finish(timeout=300) == 0, third.output()[-3000:]
    err = third.output("err")
    assert "took over" in err and f"process {first.proc.pid} of this host is gone" in err
    assert f"skipped {newest} (named by checkpoints/latest): state.json is unreadable" in err
    older = f"step_{int(newest.name[5:]) - 2:08d}"
    assert f"resumed from {out / 'checkpoints' / older}" in third.output("out")
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_ranks_stop_with_a_checkpoint_when_torchrun_is_killed(train_data, tmp_path):
    out = tmp_path / "out"
    run = Run([*TORCHRUN_2, "-m", "autosam2.cli", "train", *train_args(train_data, out)])
    try:
        run.wait_for("step 3/200")
        ranks = psutil.Process(run.proc.pid).children()
        ranks = [p for p in ranks if "autosam2.cli" in command_line(p)]
        assert len(ranks) == 2
        run.proc.kill()  # torchrun alone, with -9
        run.finish()
        assert gone([p.pid for p in ranks], timeout=60), run.output()[-3000:]
    finally:
        for proc in psutil.process_iter():
            if str(out) in command_line(proc):
                proc.kill()
    text = run.output()
    assert "its launcher (pid" in text  # the rank that noticed first stopped both
    stopped = next(line for line in text.splitlines() if line.startswith("stopped by signal at step"))
    step = int(stopped.split()[5].rstrip(";"))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert not (out / "run.lock").exists()


# stop signals -----------------------------------------------------------------------------------------

STOPPING = "SIGINT: stopping at the next step boundary, with a checkpoint; Ctrl-C again to stop now"


def ctrl_c(run: Run) -> float:
    """What a terminal's Ctrl-C does: SIGINT to every process of the foreground group (here the run's
    session: its ranks or torchrun, and loader workers). When it was."""
    os.killpg(run.proc.pid, signal.SIGINT)
    return time.monotonic()


def all_gone(run: Run) -> bool:
    """The run's session is empty within 10 s (loader workers die with their rank)."""
    deadline = time.monotonic() + 10
    while run.session_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return run.session_alive() == []


def stopped_step(text: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith("stopped by signal at step"))
    return int(line.split()[5].rstrip(";"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_next_step_exits_75_and_a_resume_with_a_new_lr_records_it(
    train_data, tmp_path
):
    from autosam2.engine.stop import EXIT_STOPPED

    out = tmp_path / "out"
    settings = {"train.max_steps": 8, "train.valid_sequences": 1}
    run = Run([*TRAIN, *train_args(train_data, out, **settings)])
    run.wait_for("step 2/8")
    ctrl_c(run)
    assert run.finish(timeout=300) == EXIT_STOPPED == 75, run.output()[-3000:]
    assert all_gone(run)
    assert run.output("err").count(STOPPING) == 1 and "Traceback" not in run.output(), run.output()[-3000:]
    k = stopped_step(run.output("out"))
    assert 2 <= k < 8 and not (out / "final.pt").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{k:08d}"  # nothing lost

    again = Run([*TRAIN, *train_args(train_data, out, **settings, **{"optim.lr": 0.01})])
    assert again.finish(timeout=300) == 0, again.output()[-3000:]
    text = again.output("out")
    line = next(line for line in text.splitlines() if line.startswith("optim.lr 0.001 -> 0.01"))
    assert line.startswith(
        f"optim.lr 0.001 -> 0.01 from step {k + 1}: the schedule goes on from its position"
    )
    promised = line.split(f"lr at step {k + 1}: ")[1].split()[0]
    logged = next(line for line in text.splitlines() if line.startswith(f"step {k + 1}/8 "))
    assert f" lr {promised} " in logged, (line, logged)
    config = (out / "config.yaml").read_text()
    assert config.startswith("# the values in effect; the run changed these as it resumed:\n")
    assert f"#   from step {k + 1}: optim.lr 0.001 -> 0.01 (" in config
    assert load_config(out / "config.yaml").optim.lr == 0.01  # still a config file, with the value in effect
    client, (run_info,) = runs_of(out)
    params, tags = run_info.data.params, run_info.data.tags
    assert (
        params["optim.lr"] == "0.001" and tags["param_changed.optim.lr"] == "0.01"
    )  # MLflow keeps the first
    assert tags["resumed_changes"].startswith(f"from step {k + 1}: optim.lr 0.001 -> 0.01")
    assert run_info.info.status == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_twice_exits_at_once_without_a_traceback(train_data, tmp_path):
    """Pressed during set-up, so the second press comes long before the first step boundary would."""
    run = Run([*TRAIN, *train_args(train_data, tmp_path / "out")])
    run.wait_for("starting from scratch")
    ctrl_c(run)
    run.wait_for(STOPPING)  # seen, then pressed again (two presses in one C call would count as one)
    pressed = ctrl_c(run)
    assert run.finish(timeout=60) == 75, run.output()[-3000:]
    assert time.monotonic() - pressed < 10, f"{time.monotonic() - pressed:.1f} s after the second Ctrl-C"
    assert all_gone(run)
    err = run.output("err")
    assert err.count(STOPPING) == 1 and "Traceback" not in run.output(), run.output()[-3000:]
    assert "SIGINT again: stopping now, not at a step boundary" in err
    assert "stopped by signal" not in run.output("out") and "step 1/" not in run.output("out")


@pytest.mark.slow
def test_ctrl_c_under_torchrun_reaches_the_ranks_once_and_they_checkpoint(train_data, tmp_path):
    """torchrun starts its ranks in sessions of their own: Ctrl-C reaches torchrun, which sends each rank
    one SIGINT, waits for them (30 s) and exits 1 with its own SignalException traceback."""
    out = tmp_path / "out"
    run = Run([*TORCHRUN_2, "-m", "autosam2.cli", "train", *train_args(train_data, out)])
    run.wait_for("step 2/200")
    ctrl_c(run)
    assert run.finish(timeout=300) == 1, run.output()[-3000:]
    text = run.output()
    assert text.count("closing signal SIGINT") == 2 and text.count(STOPPING) == 1, text[-3000:]  # rank 0 says
    k = stopped_step(text)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{k:08d}"
    assert "SignalException" in text and "autosam2/" not in "".join(
        line for line in text.splitlines() if line.strip().startswith("File ")
    )  # torchrun's traceback, none through our code
    assert not (out / "run.lock").exists()


# bad inputs -------------------------------------------------------------------------------------------


BAD_INPUTS = {  # flags, key=value overrides, the message
    "missing valid set": (
        [],
        ["data.valid=/nonexistent/valid"],
        "data.valid=/nonexistent/valid: neither a shard set",
    ),
    "missing SAM2 checkpoint": (
        ["--checkpoint", "/nonexistent/sam2.pt"],
        [],
        "model.checkpoint=/nonexistent/sam2.pt: file not found",
    ),
    "missing resume folder": (
        ["--resume", "/nonexistent/step_1"],
        [],
        "train.resume=/nonexistent/step_1: not a checkpoint folder",
    ),
    "missing DeepSpeed JSON": (
        ["--engine", "deepspeed"],
        ["train.deepspeed_config=/nonexistent/ds.json"],
        "/nonexistent/ds.json: no such file, nor a shipped DeepSpeed config (shipped: zero1, zero2, zero3)",
    ),
    "clip longer than the samples": ([], ["data.clip_len=6"], "samples hold 4 frames, fewer than clip_len 6"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_input_fails_in_one_line_before_anything_is_written(train_data, tmp_path, capsys, case):
    out = tmp_path / "out"
    flags, overrides, message = BAD_INPUTS[case]
    assert cli(["train", *flags, *train_overrides(train_data, out), *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_an_unwritable_output_directory_is_one_line(train_data, tmp_path, capsys):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=True)
    try:
        assert cli(["train", *train_overrides(train_data, readonly / "run")]) == 1
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"autosam2 train: train.output_dir={readonly / 'run'}: cannot write there (Read-only file system)"
    ]


def test_flags_may_follow_the_overrides(train_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["train", *train_overrides(train_data, out), "--checkpoint", "/nonexistent/sam2.pt"]) == 1
    assert "model.checkpoint=/nonexistent/sam2.pt: file not found" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_directory_that_is_a_file_is_one_line(train_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert cli(["train", *train_overrides(train_data, out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"autosam2 train: train.output_dir={out}: cannot write there (it is a file, not a directory)"
    ]
