"""The launcher without SLURM: submitit's local and debug executors, the job script it writes (under stubs of
SLURM's commands), launch/train.sbatch's requeue cap, and arguments read by each command's own parser."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from launch.__main__ import _output_dir_of, submit
from tests.helpers import train_overrides


def test_the_output_directory_is_read_by_the_commands_own_parser(tmp_path, tiny_root_pristine):
    assert (
        _output_dir_of("evaluate", ["--weights", "w.pt", f"--output-dir={tmp_path / 'a'}"]) == tmp_path / "a"
    )
    assert (
        _output_dir_of("evaluate", ["--weights", "w.pt", "--output-dir", str(tmp_path / "b")])
        == tmp_path / "b"
    )
    assert _output_dir_of("evaluate", ["--weights", "w.pt"]) == Path("results")
    shard = [str(tiny_root_pristine), "--split", "train", f"--out={tmp_path / 'shards' / 'train'}"]
    assert _output_dir_of("shard", shard) == tmp_path / "shards" / "train"  # its jobs: train.jobs beside it


@pytest.mark.slow
def test_a_local_two_task_job_is_one_run_on_a_basic_auth_server_that_never_sees_the_password_leak(
    train_data, tmp_path, monkeypatch, capfd
):
    """The tasks are processes of this host; each maps submitit's variables to torch's, as under srun.
    The run logs to a tracking server with MLflow's basic auth, the password given in the URI: it
    reaches the job through the environment only, not its pickled arguments, params, config or logs;
    and the server refuses a client without it."""
    import os

    from mlflow.exceptions import MlflowException

    from tests.helpers import kill_group, start_mlflow_server

    password = "s3cret-" + os.urandom(6).hex()
    uri, server = start_mlflow_server(tmp_path / "server", admin_password=password)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # the launcher sets them; monkeypatch puts them back
    try:
        with pytest.raises(MlflowException, match="401|nauthori"):
            mlflow.MlflowClient(uri).search_experiments()
        out = tmp_path / "run"
        launch = [
            "train",
            "--cluster",
            "local",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
        ]
        launch += ["--tracking-uri", uri.replace("http://", f"http://admin:{password}@")]
        (job,) = submit([*launch, "--", *train_overrides(train_data, out, **{"train.max_steps": 2})])
        results = job.results()
        assert len(results) == 2 and all(r["step"] == 2 and not r["stopped"] for r in results)
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == password  # how the job got it
        client = mlflow.MlflowClient(uri)  # authenticated by those variables
        (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
        assert run.data.params["tracking.uri"] == uri
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")] == [1, 2]
        leaks = [p for p in out.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        assert not leaks, f"the password is written in {leaks}"  # job pickles, logs, config.yaml
        assert password not in str(run.data.params) + str(run.data.tags) + "".join(capfd.readouterr())
    finally:
        kill_group(server)


# --time: sbatch's formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),  # minutes
        ("0:30", 1),  # minutes:seconds, seconds round up to a minute as sbatch rounds them
        ("1:30", 2),
        ("90:00", 90),  # no field has a range
        ("0:90", 2),
        ("04:00:00", 240),  # hours:minutes:seconds
        ("1:00:01", 61),
        ("1-0", 1440),  # days-hours
        ("1-12", 2160),
        ("1-12:30", 2190),  # days-hours:minutes
        ("2-00:00:01", 2881),  # days-hours:minutes:seconds
    ],
)
def test_time_takes_every_sbatch_format_in_minutes(text, minutes):
    from launch.__main__ import build_parser

    assert build_parser().parse_args(["train", "--time", text]).time == minutes


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1h", "is not a time limit"),
        ("1:2:3:4", "is not a time limit"),
        ("1-2-3", "is not a time limit"),
        ("1-", "is not a time limit"),
        ("-5", "is not a time limit"),
        ("1.5", "is not a time limit"),
        (" 5", "is not a time limit"),
        ("", "is not a time limit"),
        ("0", "is no time limit"),
        ("0:00", "is no time limit"),
        ("UNLIMITED", "is no time limit"),
        ("-1", "is no time limit"),
    ],
)
def test_a_bad_time_is_one_argparse_line(text, why, capsys):
    from launch.__main__ import main

    with pytest.raises(SystemExit) as refused:
        main(["train", f"--time={text}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and [line for line in err if "error" in line] == err[-1:]  # after usage
    assert err[-1].startswith(f"python -m launch: error: argument --time: {text!r} {why}")
    if why == "is not a time limit":
        assert err[-1].endswith("MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")


# the job script: set-up lines, the time limit, the requeue cap -----------------------------------------


def fake_scheduler(tmp_path: Path, monkeypatch, job_id: int) -> Path:
    """Stubs of SLURM's commands on PATH (the scheduler's CLI only; no SLURM runs): `sbatch` keeps the
    job script it is given and answers as sbatch does, `srun` exists (submitit looks for it)."""
    bin_ = tmp_path / "fake-bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(
        f'#!/usr/bin/env bash\ncp "$1" {tmp_path / "job.sh"}\necho "Submitted batch job {job_id}"\n'
    )
    (bin_ / "srun").write_text("#!/usr/bin/env bash\nexit 1\n")
    for stub in bin_.iterdir():
        stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    return tmp_path / "job.sh"


def test_the_sites_and_the_commands_set_up_lines_run_in_the_job_script_before_srun(tmp_path, monkeypatch):
    import pickle

    from autosam2.engine.dist.slurm import MAX_REQUEUES

    script = fake_scheduler(tmp_path, monkeypatch, 4242)
    site = tmp_path / "site.yaml"
    site.write_text("setup:\n  - module load cuda/12.4\n  - source ~/venv/bin/activate\n")
    monkeypatch.setenv("AUTOSAM2_SITE", str(site))
    out = tmp_path / "eval"
    (job,) = submit(
        ["evaluate", "--cluster", "slurm", "--time", "1-12:30", "--setup", "export NCCL_DEBUG=WARN"]
        + ["--", "--weights", "w.pt", "--output-dir", str(out)]
    )
    lines = script.read_text().splitlines()
    setup = ["module load cuda/12.4", "source ~/venv/bin/activate", "export NCCL_DEBUG=WARN"]
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert [lines.index(line) for line in setup] == sorted(lines.index(line) for line in setup)
    assert max(lines.index(line) for line in setup) < srun
    assert "#SBATCH --time=2190" in lines
    assert job.paths.submission_file.read_text() == script.read_text()  # kept in the job folder
    assert job.paths.folder.parent == tmp_path / "eval.jobs"  # beside the output, as evaluate's
    with open(job.paths.submitted_pickle, "rb") as f:
        submitted = pickle.load(f)
    assert (submitted._timeout_min, submitted._timeout_countdown) == (2190, MAX_REQUEUES)


@pytest.mark.parametrize(
    ("site", "problem"),
    [
        ("setup: module load cuda\n", "setup must be a list of shell lines"),
        ("setup: [module load cuda]\npartition: gpu\n", "unknown key(s) partition; known: setup"),
        ("- module load cuda\n", "a mapping of setup, not list"),
        ("setup: [a\n", "not YAML"),
        (None, "No such file or directory"),
    ],
)
def test_a_bad_site_file_is_one_line_and_nothing_is_made(tmp_path, monkeypatch, capsys, site, problem):
    from launch.__main__ import main

    path = tmp_path / "site.yaml"
    if site is not None:
        path.write_text(site)
    monkeypatch.setenv("AUTOSAM2_SITE", str(path))
    out = tmp_path / "eval"
    assert main(["evaluate", "--cluster", "debug", "--", "--weights", "w.pt", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"launch: {path} (AUTOSAM2_SITE): {problem}")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["site.yaml"] if site is not None else [])


def run_train_sbatch(tmp_path: Path, restarts: int | None, env: dict[str, str]) -> tuple[int, str, Path]:
    """launch/train.sbatch under stubs of SLURM's `srun` and `scontrol` (no SLURM runs): its srun starts a
    stand-in rank (named as the template's ranks are; it exits on SIGUSR2); once the rank runs, the
    batch shell gets SIGUSR2, as SLURM sends it before the time limit. (status, output, scontrol's log)."""
    import signal
    import subprocess
    import sys
    import time

    bin_, log = tmp_path / "fake-bin", tmp_path / "scontrol.log"
    bin_.mkdir()
    rank = "import pathlib, signal, sys, time; signal.signal(signal.SIGUSR2, lambda *a: sys.exit(0)); "
    rank += "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)"
    (bin_ / "srun").write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\n'
        f'exec {sys.executable} -c "{rank}" {tmp_path / "started"} -u -m autosam2.cli train\n'
    )
    (bin_ / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {log}\n[ "$1 $2" = "show hostnames" ] && echo node01\nexit 0\n'
    )
    for stub in bin_.iterdir():
        stub.chmod(0o755)
    job = str(900000 + os.getpid() % 90000)  # this test's rank alone carries it
    slurm = {"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1"}
    if restarts is not None:
        slurm["SLURM_RESTART_COUNT"] = str(restarts)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    repo = Path(__file__).resolve().parents[1]
    full = {**base, **slurm, **env, "PATH": f"{bin_}:{base['PATH']}", "AUTOSAM2_PYTHON": sys.executable}
    full["PYTHONPATH"] = str(repo)
    batch = subprocess.Popen(
        ["bash", str(repo / "launch" / "train.sbatch"), "--config", "c.yaml"],
        env=full, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and batch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if batch.poll() is None:
        batch.send_signal(signal.SIGUSR2)
    output, _ = batch.communicate(timeout=120)
    return batch.returncode, output, log


@pytest.mark.parametrize(
    ("restarts", "env", "requeued"),
    [
        (None, {}, True),  # the first run; the cap and the port from python -m autosam2.engine.dist
        (2, {"AUTOSAM2_RDZV_PORT": "29500"}, True),  # the last requeue under the cap of 3
        (3, {"AUTOSAM2_RDZV_PORT": "29500"}, False),  # at the cap
        (3, {"AUTOSAM2_RDZV_PORT": "29500", "AUTOSAM2_MAX_REQUEUES": "5"}, True),
        (0, {"AUTOSAM2_RDZV_PORT": "29500", "AUTOSAM2_MAX_REQUEUES": "0"}, False),
    ],
)
def test_train_sbatch_requeues_itself_up_to_the_launchers_cap(tmp_path, restarts, env, requeued):
    from autosam2.engine.dist.slurm import MAX_REQUEUES, job_port, map_slurm_env

    assert MAX_REQUEUES == 3  # the cases above
    status, output, log = run_train_sbatch(tmp_path, restarts, env)
    calls = log.read_text().splitlines()
    args = (tmp_path / "srun.args").read_text().splitlines()
    job_id = next(a for a in args if a.startswith("--rdzv-id=")).split("=", 1)[1]
    if requeued:
        assert status == 0, output
        assert calls[-1] == f"requeue {job_id}"
        assert f"caught SIGUSR2, checkpointing and requeueing job {job_id}" in output
    else:
        assert status == 75, output
        assert not [c for c in calls if c.startswith("requeue")]
        cap = env.get("AUTOSAM2_MAX_REQUEUES", "3")
        line = f"not requeueing it: it has restarted {restarts} time(s), the cap is {cap}"
        assert [x for x in output.splitlines() if "not requeueing" in x] == [
            f"autosam2: caught SIGUSR2, checkpointing job {job_id}; {line} (AUTOSAM2_MAX_REQUEUES); "
            "submit it again to resume"
        ]
    if not env:  # the template's rendezvous port is the one the launcher's tasks get under srun
        launched = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": job_id}
        map_slurm_env(launched)
        assert f"--rdzv-endpoint=node01:{job_port(job_id)}" in args
        assert launched["MASTER_PORT"] == str(job_port(job_id))


def test_train_sbatch_refuses_a_cap_that_is_no_number_in_one_line(tmp_path):
    status, output, log = run_train_sbatch(
        tmp_path, 0, {"AUTOSAM2_RDZV_PORT": "1", "AUTOSAM2_MAX_REQUEUES": "x"}
    )
    assert status == 2
    assert output.strip().splitlines() == ["autosam2: AUTOSAM2_MAX_REQUEUES=x is not a whole number"]
    assert not (tmp_path / "started").exists()


def test_the_cap_command_prints_the_cap_the_launcher_gives_submitit(tmp_path, monkeypatch, capsys):
    """`python -m autosam2.engine.dist max-requeues` (what train.sbatch reads) is the count of time-outs
    the launcher's jobs requeue after, unless --max-requeues says otherwise."""
    import pickle

    from autosam2.engine.dist.__main__ import main as dist

    assert dist(["max-requeues"]) == 0
    cap = int(capsys.readouterr().out)
    fake_scheduler(tmp_path, monkeypatch, 4343)
    for given, countdown in (([], cap), (["--max-requeues", "7"], 7)):
        out = tmp_path / f"eval{countdown}"
        (job,) = submit(
            ["evaluate", "--cluster", "slurm", *given, "--", "--weights", "w.pt", "--output-dir", str(out)]
        )
        with open(job.paths.submitted_pickle, "rb") as f:
            assert pickle.load(f)._timeout_countdown == countdown


# predict and benchmark jobs -----------------------------------------------------------------------------


def test_a_predict_job_writes_the_commands_output_and_its_logs_beside_it(
    tmp_path, tiny_root_pristine, weights, capsys
):
    out = tmp_path / "pred"
    (job,) = submit(
        ["predict", "--cluster", "debug", "--setup", "module load cuda"]
        + ["--", str(tiny_root_pristine), "--weights", str(weights), "--output-dir", str(out)]
        + ["--no-overlays", "--cpu"]
    )
    assert "set-up lines (1) run in SLURM's job script only; --cluster debug runs without them" in (
        capsys.readouterr().out
    )
    assert job.result() == 0
    assert (out / "frames.csv").read_text().startswith("sequence,frame,presence")
    assert [p.name for p in (out / "masks").iterdir()] == ["seq3"]  # the valid split's sequence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "pred.jobs"]  # the logs beside it


@pytest.fixture(scope="module")
def sunseg_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SUN-SEG root with one test split of one case of four 64 px frames."""
    from tests.layout_fixtures.sunseg import write_sunseg

    root = tmp_path_factory.mktemp("sunseg") / "SUN-SEG"
    return write_sunseg(root, frames=4, splits={"TestEasyDataset/Seen": ["case2_1"]})


def test_a_benchmark_job_writes_the_commands_output_and_its_logs_beside_it(tmp_path, sunseg_split, weights):
    import json

    from autosam2.eval.benchmark import OURS

    out = tmp_path / "bench"
    benchmark = ["sunseg", "--weights", str(weights), "--data", str(sunseg_split), "--output-dir", str(out)]
    benchmark += ["--splits", "TestEasyDataset/Seen", "--no-overlays", "--cpu"]
    (job,) = submit(["benchmark", "--cluster", "debug", "--", *benchmark])
    assert job.result() == 0
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["split"] for r in rows if r["source"] == OURS] == ["TestEasyDataset/Seen"]
    assert (out / "TestEasyDataset_Seen" / "metrics.json").is_file()
    assert (tmp_path / "bench.jobs").is_dir()  # the logs beside the output


@pytest.mark.parametrize("what", ["predict", "benchmark"])
def test_a_missing_input_or_split_is_refused_at_submission_in_one_line(tmp_path, sunseg_split, what, capsys):
    from launch.__main__ import main

    out = tmp_path / "out"
    if what == "predict":
        args = [str(tmp_path / "nowhere"), "--weights", "w.pt", "--output-dir", str(out)]
        problem = f"launch: {tmp_path / 'nowhere'}: no such file or folder"
    else:
        args = ["sunseg", "--weights", "w.pt", "--data", str(sunseg_split), "--output-dir", str(out)]
        args += ["--splits", "TestHardDataset/Unseen"]
        problem = f"launch: {sunseg_split}: no TestHardDataset/Unseen"
    assert main([what, "--cluster", "local", "--", *args]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(problem)
    assert list(tmp_path.iterdir()) == []
