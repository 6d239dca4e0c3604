"""`autosam2 evaluate` kept sequence by sequence: a run stopped by SLURM's signal goes on with --resume to
the very metrics.json of an uninterrupted run (and to its figures on two ranks), an unfinished folder is
ours and says so, resuming with other inputs is refused in one line naming what differs, and the
launcher's job requeues itself with --resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autosam2.cli import main as cli
from autosam2.config import ConfigError
from autosam2.errors import OutputRefused
from autosam2.eval.resume import claim_sequences, identity
from autosam2.outputs import EVALUATION
from tests.helpers import TORCHRUN_2

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "autosam2.cli"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # equal float sums, 1 or 2 ranks


@pytest.fixture(scope="module")
def long_split(tmp_path_factory) -> Path:
    """Four valid sequences of 15 frames at 64 px: a second or more each on the CPU, so a signal sent
    when the first is kept lands while the split is half done."""
    from autosam2.data.synthetic import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("long") / "polyp_gen"
    write_dataset(root, SynthSpec(train_sequences=1, valid_sequences=4, frames=15, size=64, seed=2))
    return root


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=600)


def run_here(argv: list[str], capsys) -> subprocess.CompletedProcess:
    """`autosam2` with `argv` in this process, for the runs that evaluate no frame (a refusal, a resume
    with every sequence finished): their exit status and what they printed."""
    capsys.readouterr()
    code = cli(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stop_when_a_sequence_is_kept(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    """Run `cmd`, send SLURM's time-limit signal (SIGUSR2) once the first sequence is kept in `out`, and
    wait for it to end."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list((out / "sequences").glob("*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no sequence was kept"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_stopped_evaluation_resumes_to_the_metrics_of_an_uninterrupted_one(
    long_split, weights, tmp_path, capsys
):
    evaluate = [*CLI, "evaluate", "--weights", str(weights), "--data", str(long_split), "--cpu"]
    here = evaluate[len(CLI) :]  # the same command, run in this process
    whole, parted, two = tmp_path / "whole", tmp_path / "parted", tmp_path / "two"
    done = run([*evaluate, "--output-dir", str(whole)])
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = stop_when_a_sequence_is_kept([*evaluate, "--output-dir", str(parted)], parted)
    assert stopped.returncode == 75, stopped.stderr[-3000:]  # EXIT_STOPPED: go on with --resume
    kept = sorted(p.stem for p in (parted / "sequences").glob("*.json"))
    assert 1 <= len(kept) < 4 and sorted(p.name for p in (parted / "masks").iterdir()) == kept
    assert f"stopped by SIGUSR2: {len(kept)} of 4 sequences finished, kept in {parted}" in stopped.stdout
    assert "SIGUSR2: stopping at the end of the sequence in progress" in stopped.stderr
    assert not (parted / "metrics.json").exists()
    progress = json.loads((parted / "progress.json").read_text())
    assert progress["command"] == "evaluate" and progress["finished"] is False
    assert progress["inputs"]["weights"]["path"] == str(weights.resolve())

    before = files(parted)
    refused = run_here([*here, "--output-dir", str(parted)], capsys)  # neither --resume nor --overwrite
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"autosam2 evaluate: {parted}: holds an evaluation, unfinished ({len(kept)} sequences finished); pass "
        "--resume to go on with it, or --overwrite to start again"
    ]
    refused = run_here(
        [*here, "--output-dir", str(parted), "--resume", "--mode", "frame", "--no-overlays"], capsys
    )
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"autosam2 evaluate: {parted}: holds an evaluation of other inputs (mode: then video, now frame; "
        "overlays: then true, now false); resume with the same ones, or pass --overwrite to start again"
    ]
    assert files(parted) == before
    shutil.copytree(parted, two)

    resumed = run([*evaluate, "--output-dir", str(parted), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {parted}: {len(kept)} sequences finished before, skipped" in resumed.stdout
    assert "4 sequences over 1 rank(s), 60 frames" in resumed.stdout
    assert (parted / "metrics.json").read_bytes() == (whole / "metrics.json").read_bytes()
    for kind in ("masks", "soft", "overlays", "sequences"):
        assert files(parted / kind) == files(whole / kind), kind
    again = run_here([*here, "--output-dir", str(parted), "--resume"], capsys)
    assert again.returncode == 0 and "the evaluation is complete; nothing to resume" in again.stdout
    (parted / "metrics.json").unlink()  # a finished folder whose summary is gone: its records make it again
    again = run_here([*here, "--output-dir", str(parted), "--resume"], capsys)
    assert again.returncode == 0 and "4 sequences finished before, skipped" in again.stdout, again.stderr[
        -3000:
    ]
    assert (parted / "metrics.json").read_bytes() == (whole / "metrics.json").read_bytes()

    # on two ranks: the sequences finished before are read back from the folder, the rest split
    resumed = run([*TORCHRUN_2, *evaluate[1:], "--output-dir", str(two), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one_rank, two_ranks = (json.loads((d / "metrics.json").read_text()) for d in (whole, two))
    assert two_ranks["ranks"] == 2 and {**two_ranks, "ranks": 1} == one_rank
    assert files(two / "masks") == files(whole / "masks")


def _unfinished(out: Path, inputs: dict, done: list[str], finished: bool = False) -> None:
    (out / "sequences").mkdir(parents=True)
    (out / "progress.json").write_text(
        json.dumps({"command": "evaluate", "inputs": inputs, "finished": finished})
    )
    for name in done:
        (out / "sequences" / f"{name}.json").write_text('{"state": null}')


def test_resume_takes_only_an_unfinished_evaluation_of_the_same_inputs(tmp_path, weights):
    inputs = {"weights": identity(weights), "mode": "video", "checkpoint": None}
    out = tmp_path / "out"

    def claim(resume: bool = True, overwrite: bool = False, now: dict = inputs):
        return claim_sequences(out, EVALUATION, "evaluate", now, [weights], overwrite, resume)

    fresh = claim()  # nothing there yet: --resume starts
    assert fresh.fresh and fresh.done == set() and not fresh.finished
    _unfinished(out, inputs, ["seq1", "seq2"])
    (out / "masks" / "seq3").mkdir(parents=True)  # what a stopped sequence left
    resumed = claim()
    assert not resumed.fresh and resumed.done == {"seq1", "seq2"} and not resumed.finished
    assert claim(resume=False, overwrite=True).fresh
    with pytest.raises(OutputRefused, match=r"unfinished \(2 sequences finished\); pass --resume"):
        claim(resume=False)
    with pytest.raises(ConfigError, match="--resume and --overwrite: choose one"):
        claim(overwrite=True)

    other = tmp_path / "other.pt"
    other.write_bytes(b"x" * 10)
    with pytest.raises(OutputRefused) as err:
        claim(now={**inputs, "weights": identity(other), "mode": "frame"})
    message = str(err.value)
    assert "other inputs (mode: then video, now frame; weights: then " in message
    assert f"then {weights.resolve()} ({weights.stat().st_size} bytes, modified " in message
    assert f"now {other.resolve()} (10 bytes, modified " in message
    assert len(message.splitlines()) == 1

    (out / "notes.txt").write_text("mine")  # what is not ours is named, with or without a flag
    for resume in (True, False):
        with pytest.raises(OutputRefused, match="holds notes.txt beside an evaluation"):
            claim(resume=resume)


def test_a_finished_evaluation_is_not_run_again_and_one_without_progress_is_not_resumed(tmp_path, weights):
    inputs = {"weights": identity(weights)}
    out = tmp_path / "out"
    _unfinished(out, inputs, ["seq1"], finished=True)
    (out / "metrics.json").write_text(json.dumps({"summary": {}, "weights": str(weights)}))
    assert claim_sequences(out, EVALUATION, "evaluate", inputs, [], False, True).finished
    with pytest.raises(OutputRefused, match="already holds an evaluation; pass --overwrite"):
        claim_sequences(out, EVALUATION, "evaluate", inputs, [], False, False)
    shutil.rmtree(out / "sequences")
    (out / "progress.json").unlink()  # an evaluation written whole, with no record of its inputs
    with pytest.raises(OutputRefused, match="holds an evaluation with no progress.json to resume"):
        claim_sequences(out, EVALUATION, "evaluate", inputs, [], False, True)


@pytest.mark.parametrize(
    ("progress", "record", "why"),
    [
        ('{"command": "evaluate", "inp', None, "progress.json: not a JSON object"),
        ("[1]", None, "progress.json: not a JSON object"),
        (
            '{"command": "predict", "inputs": {}}',
            None,
            "progress.json: the progress of 'predict', not of 'evaluate'",
        ),
        ('{"command": "evaluate", "inputs": [1]}', None, "progress.json: its inputs are not a JSON object"),
        ('{"command": "evaluate", "inputs": "x"}', None, "progress.json: its inputs are not a JSON object"),
        (None, '{"sta', "sequences/seq1.json: cannot be read back (Unterminated string"),
        (None, "[1, 2]", "sequences/seq1.json: not a JSON object"),
    ],
)
def test_resume_refuses_a_broken_progress_or_record_in_one_line_before_any_work(
    tmp_path, progress, record, why
):
    """A progress.json or a finished sequence's record that is not what an evaluation wrote is named, with
    what is wrong, when the folder is claimed; nothing in it is touched."""
    out = tmp_path / "out"
    _unfinished(out, {"mode": "video"}, ["seq1"])
    (out / "metrics.json").write_text(json.dumps({"summary": {}, "weights": "w.pt"}))
    for name, text in (("progress.json", progress), ("sequences/seq1.json", record)):
        if text is not None:
            (out / name).write_text(text)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputRefused) as err:
        claim_sequences(out, EVALUATION, "evaluate", {"mode": "video"}, [], False, True)
    assert str(err.value).startswith(f"{out / why.split(':')[0]}: {why.split(': ', 1)[1]}")
    assert str(err.value).endswith("; cannot resume from it, pass --overwrite to start again")
    assert len(str(err.value).splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_sequences_sums_come_back_from_json_to_the_bit():
    """A record read back gives the figures of the accumulator it was taken from, exactly: running sums
    and the sunseg curves (NaN included) through `json`."""
    from autosam2.metrics import MetricAccumulator

    rng = np.random.default_rng(0)
    for mode in ("ours", "sunseg"):
        scored = MetricAccumulator(mode=mode)
        for name in ("a", "b"):
            for _ in range(4):
                gt = rng.random((24, 24)) > (0.7 if name == "a" else -1.0)  # b: all polyp, no background
                scored.add_frame(name, rng.random((24, 24)), gt)
        back = MetricAccumulator(mode=mode)
        for name in ("b", "a"):
            back.add_state(name, json.loads(json.dumps(scored.state(name))))
        assert json.dumps(back.per_sequence()) == json.dumps(scored.per_sequence())
        assert json.dumps(back.summary()) == json.dumps(scored.summary())
        assert mode == "ours" or any(math.isnan(v) for v in scored.per_sequence()["b"].values())
        with pytest.raises(ValueError, match="already added"):
            back.add_state("a", scored.state("a"))


def test_the_evaluation_job_requeues_itself_with_resume(monkeypatch):
    """Stopped by submitit's requeue signal, rank 0 of the job hands over to submitit's handler, and the
    job it requeues has --resume and no --overwrite (which would start the folder again); a job SLURM
    requeued itself (SLURM_RESTART_COUNT) goes on the same way."""
    import submitit

    import autosam2.evaluate
    import launch.__main__ as launcher

    calls, seen = [], []
    monkeypatch.setattr(launcher, "_signals_came", lambda wait_s: (signal.SIGUSR2,))
    monkeypatch.setattr(autosam2.evaluate, "main", lambda argv: seen.append(argv) or 75)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        monkeypatch.setenv("RANK", "0")
        job = launcher.EvaluateJob(["--weights", "w.pt", "--overwrite"])
        assert isinstance(job, submitit.helpers.Checkpointable) and job() == 75 and calls == [signal.SIGUSR2]
        monkeypatch.setenv("RANK", "1")
        assert job() == 75 and calls == [signal.SIGUSR2]  # rank 0 alone requeues
        monkeypatch.setattr(autosam2.evaluate, "main", lambda argv: seen.append(argv) or 0)
        assert job() == 0 and calls == [signal.SIGUSR2]
        assert seen == [["--weights", "w.pt", "--overwrite"]] * 3  # the first run: as submitted
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert job() == 0 and seen[-1] == ["--weights", "w.pt", "--resume"]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    again = launcher.EvaluateJob(["--weights", "w.pt", "--overwrite"]).checkpoint().function
    assert isinstance(again, launcher.EvaluateJob) and again.argv == ["--weights", "w.pt", "--resume"]
    assert again.checkpoint().function.argv == ["--weights", "w.pt", "--resume"]
