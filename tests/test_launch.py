"""The launcher without SLURM: submitit's local and debug executors, the job script it writes (under stubs of
SLURM's commands), the sbatch templates' requeue caps, and arguments read by each command's own parser."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from launch.__main__ import _output_dir_of, submit
from tests.helpers import train_overrides


def test_the_output_directory_is_read_by_the_commands_own_parser(
    tmp_path, tiny_root_pristine, weights, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    w = str(weights)  # a weights file (its format is read at submission, its tensors by the job)
    assert _output_dir_of("evaluate", ["--weights", w, f"--output-dir={tmp_path / 'a'}"]) == tmp_path / "a"
    assert _output_dir_of("evaluate", ["--weights", w, "--output-dir", str(tmp_path / "b")]) == tmp_path / "b"
    assert _output_dir_of("evaluate", ["--weights", w]) == Path("results")
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
        ("1-25:00:00", 2940),  # sbatch sums the fields: no range on hours either
        ("24855-03:14", 35791394),  # the longest sbatch's 32-bit seconds hold
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
        ("24855-03:15", "is longer than sbatch can take"),
        ("99999999999999999999", "is longer than sbatch can take"),
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


@pytest.mark.parametrize("item", ["=x", "", " = ", "--=1"])
def test_an_sbatch_parameter_without_a_key_is_one_argparse_line(item, capsys):
    from launch.__main__ import main

    with pytest.raises(SystemExit) as refused:
        main(["train", f"--sbatch={item}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2
    assert (
        err[-1]
        == f"python -m launch: error: argument --sbatch: {item!r} names no parameter: KEY=VALUE, or KEY alone for a flag"
    )


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


def test_the_sites_and_the_commands_set_up_lines_run_in_the_job_script_before_srun(
    tmp_path, weights, monkeypatch
):
    import pickle

    from autosam2.engine.dist.slurm import MAX_REQUEUES

    script = fake_scheduler(tmp_path, monkeypatch, 4242)
    site = tmp_path / "site.yaml"
    site.write_text("setup:\n  - module load cuda/12.4\n  - source ~/venv/bin/activate\n")
    monkeypatch.setenv("AUTOSAM2_SITE", str(site))
    out = tmp_path / "eval"
    (job,) = submit(
        ["evaluate", "--cluster", "slurm", "--time", "1-12:30", "--setup", "export NCCL_DEBUG=WARN"]
        + ["--", "--weights", str(weights), "--output-dir", str(out)]
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


# a stand-in rank: it says it runs (argv[1]) and exits 0 on SIGUSR2, saying so (argv[2])
STAND_IN = (
    "import pathlib, signal, sys, time; "
    "signal.signal(signal.SIGUSR2, lambda *a: (pathlib.Path(sys.argv[2]).touch(), sys.exit(0))); "
    "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)"
)
# how each template's ranks look to `ps`: torchrun's workers (python -u), srun's tasks
RANK_TAIL = {"train.sbatch": "-u -m autosam2.cli train", "evaluate.sbatch": "-m autosam2.cli evaluate"}
# the job id of a template run: this test's ranks alone carry it
SBATCH_JOB = str(900000 + os.getpid() % 90000)


def sbatch_env(bin_: Path, restarts: int | None, env: dict[str, str]) -> dict[str, str]:
    """A batch job's environment without SLURM: its variables, the stubs in `bin_` first on PATH."""
    import sys

    slurm = {"SLURM_JOB_ID": SBATCH_JOB, "SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1"}
    if restarts is not None:
        slurm["SLURM_RESTART_COUNT"] = str(restarts)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "AUTOSAM2_"))}
    repo = Path(__file__).resolve().parents[1]
    full = {**base, **slurm, **env, "PATH": f"{bin_}:{base['PATH']}", "AUTOSAM2_PYTHON": sys.executable}
    full["PYTHONPATH"] = str(repo)
    return full


def run_sbatch(
    tmp_path: Path, template: str, restarts: int | None, env: dict[str, str], args: list[str]
) -> tuple[int, str, Path]:
    """launch/`template` under stubs of SLURM's `srun` and `scontrol` (no SLURM runs): its srun starts a
    stand-in rank (named as the template's ranks are; it exits on SIGUSR2); beside it runs a decoy, a
    rank of another job of the same user on the node (named the same, another SLURM_JOB_ID). Once the
    rank runs, the batch shell gets SIGUSR2, as SLURM sends it before the time limit. The decoy must not
    get it. (status, output, scontrol's log); srun's arguments in srun.args, its MASTER_PORT in srun.port."""
    import signal
    import subprocess
    import sys
    import time

    bin_, log = tmp_path / "fake-bin", tmp_path / "scontrol.log"
    bin_.mkdir()
    (bin_ / "srun").write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\n'
        f'echo "${{MASTER_PORT:-}}" > {tmp_path / "srun.port"}\n'
        f'exec {sys.executable} -c "{STAND_IN}" {tmp_path / "started"} {tmp_path / "stopped"} '
        f"{RANK_TAIL[template]}\n"
    )
    (bin_ / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {log}\n[ "$1 $2" = "show hostnames" ] && echo node01\nexit 0\n'
    )
    for stub in bin_.iterdir():
        stub.chmod(0o755)
    full = sbatch_env(bin_, restarts, env)
    decoy_env = {**full, "SLURM_JOB_ID": str(int(SBATCH_JOB) - 100000)}  # no test's job
    decoy = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, tmp_path / "decoy.started", tmp_path / "decoy.stopped",
         *RANK_TAIL[template].split()],
        env=decoy_env,
    )  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    try:
        batch = subprocess.Popen(
            ["bash", str(repo / "launch" / template), *args],
            env=full, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        started = [tmp_path / "started", tmp_path / "decoy.started"]
        while batch.poll() is None and not all(map(Path.exists, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if batch.poll() is None:
            batch.send_signal(signal.SIGUSR2)
        output, _ = batch.communicate(timeout=120)
        assert decoy.poll() is None and not (tmp_path / "decoy.stopped").exists()  # another job's rank
    finally:
        decoy.kill()
        decoy.wait()
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
    status, output, log = run_sbatch(tmp_path, "train.sbatch", restarts, env, ["--config", "c.yaml"])
    calls = log.read_text().splitlines()
    args = (tmp_path / "srun.args").read_text().splitlines()
    job_id = next(a for a in args if a.startswith("--rdzv-id=")).split("=", 1)[1]
    assert (tmp_path / "stopped").exists()  # its rank got SIGUSR2 (another job's did not: run_sbatch)
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
        assert torchrun_on_node(args, 3)[:4] == ["-m", "torch.distributed.run", "--node-rank=3", "--nnodes=1"]
        assert "--rdzv-backend=static" in args  # no dynamic rendezvous: it gathers hosts in 1 s polls


def torchrun_on_node(srun_args: list[str], node_id: int) -> list[str]:
    """The arguments train.sbatch's srun command gives Python on the node SLURM numbers `node_id`
    (SLURM_NODEID, set by srun for each task): `srun_args` run with `echo` for Python."""
    import subprocess

    head = srun_args.index("bash")
    command = ["bash", *srun_args[head + 1 :]]
    command[command.index(srun_args[head + 3])] = "echo"  # the Python the template was given
    env = {**os.environ, "SLURM_NODEID": str(node_id)}
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()


def test_train_sbatch_refuses_a_cap_that_is_no_number_in_one_line(tmp_path):
    status, output, log = run_sbatch(
        tmp_path, "train.sbatch", 0, {"AUTOSAM2_RDZV_PORT": "1", "AUTOSAM2_MAX_REQUEUES": "x"}, []
    )
    assert status == 2
    assert output.strip().splitlines() == ["autosam2: AUTOSAM2_MAX_REQUEUES=x is not a whole number"]
    assert not (tmp_path / "started").exists()


@pytest.mark.parametrize(
    ("restarts", "env", "requeued"),
    [
        (None, {}, True),  # the first run; the cap from python -m autosam2.engine.dist
        (3, {"AUTOSAM2_RDZV_PORT": "29500"}, False),  # at the cap of 3
        (3, {"AUTOSAM2_MAX_REQUEUES": "5"}, True),
        (0, {"AUTOSAM2_MAX_REQUEUES": "0"}, False),
    ],
)
def test_evaluate_sbatch_requeues_itself_up_to_the_launchers_cap(tmp_path, restarts, env, requeued):
    """On SIGUSR2 the batch shell passes it to srun, which forwards it to this job's ranks (the stand-in
    is srun's task here); they stop, and the job requeues itself while under the cap, else exits 75."""
    from autosam2.engine.dist.slurm import MAX_REQUEUES, job_port, map_slurm_env

    assert MAX_REQUEUES == 3  # the cases above
    status, output, log = run_sbatch(tmp_path, "evaluate.sbatch", restarts, env, ["--weights", "w.pt"])
    assert (tmp_path / "stopped").exists()  # its rank got SIGUSR2 (another job's did not: run_sbatch)
    assert (tmp_path / "srun.args").read_text().splitlines()[-4:] == [
        "evaluate", "--resume", "--weights", "w.pt"
    ]  # fmt: skip
    if requeued:
        assert status == 0, output
        assert log.read_text().splitlines() == [f"requeue {SBATCH_JOB}"]
        assert (
            f"autosam2: caught SIGUSR2, stopping at the end of the sequences in progress and requeueing job "
            f"{SBATCH_JOB}" in output.splitlines()
        )
    else:
        assert status == 75, output
        assert not log.exists()  # no scontrol call
        cap = env.get("AUTOSAM2_MAX_REQUEUES", "3")
        line = f"not requeueing it: it has restarted {restarts} time(s), the cap is {cap}"
        assert [x for x in output.splitlines() if "not requeueing" in x] == [
            f"autosam2: caught SIGUSR2, stopping job {SBATCH_JOB} at the end of the sequences in progress; "
            f"{line} (AUTOSAM2_MAX_REQUEUES); submit it again to resume"
        ]
    # the ranks' port: the job's, as the launcher's tasks and train.sbatch's torchrun get it
    port = (tmp_path / "srun.port").read_text().strip()
    assert port == env.get("AUTOSAM2_RDZV_PORT", "")
    if not port:
        launched = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": SBATCH_JOB}
        map_slurm_env(launched)
        assert launched["MASTER_PORT"] == str(job_port(SBATCH_JOB))


def test_evaluate_sbatch_refuses_a_cap_that_is_no_number_in_one_line(tmp_path):
    status, output, _ = run_sbatch(tmp_path, "evaluate.sbatch", 0, {"AUTOSAM2_MAX_REQUEUES": "-1"}, [])
    assert status == 2
    assert output.strip().splitlines() == ["autosam2: AUTOSAM2_MAX_REQUEUES=-1 is not a whole number"]
    assert not (tmp_path / "started").exists() and not (tmp_path / "srun.args").exists()


@pytest.mark.parametrize(
    ("restarts", "given", "resume", "overwrite"),
    [
        (None, [], True, False),  # the first run resumes too: a job submitted again goes on
        (0, ["--resume"], True, False),  # the user's --resume as well: the same run
        (0, ["--overwrite"], False, True),  # the first run starts the folder again, as asked
        (1, ["--overwrite"], True, False),  # a requeued one goes on instead
    ],
)
def test_evaluate_sbatch_runs_evaluate_with_resume_and_its_status(
    tmp_path, restarts, given, resume, overwrite
):
    """The arguments srun gets are ones `autosam2 evaluate` parses (--resume twice is one --resume; a
    requeued run drops --overwrite, which would start the folder again), and srun's status is the job's."""
    import subprocess

    from autosam2.evaluate import build_parser

    bin_ = tmp_path / "fake-bin"
    bin_.mkdir()
    (bin_ / "srun").write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\nexit 75\n'
    )
    (bin_ / "srun").chmod(0o755)
    env = sbatch_env(bin_, restarts, {"AUTOSAM2_MAX_REQUEUES": "3"})
    repo = Path(__file__).resolve().parents[1]
    args = ["--weights", "w a.pt", *given, "--output-dir", "out"]
    done = subprocess.run(["bash", str(repo / "launch" / "evaluate.sbatch"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 75 and done.stderr == "", done.stderr  # a stopped run's status, unchanged
    srun = (tmp_path / "srun.args").read_text().splitlines()
    command = srun[srun.index("evaluate") + 1 :]
    others = [a for a in command if a not in ("--resume", "--overwrite")]
    assert others == ["--weights", "w a.pt", "--output-dir", "out"]  # in order, the space kept
    parsed = build_parser().parse_args(command)
    assert (parsed.resume, parsed.overwrite, parsed.weights) == (resume, overwrite, "w a.pt")


def test_the_cap_command_prints_the_cap_the_launcher_gives_submitit(tmp_path, weights, monkeypatch, capsys):
    """`python -m autosam2.engine.dist max-requeues` (what the sbatch templates read) is the count of
    time-outs the launcher's jobs requeue after, unless --max-requeues says otherwise."""
    import pickle

    from autosam2.engine.dist.__main__ import main as dist

    assert dist(["max-requeues"]) == 0
    cap = int(capsys.readouterr().out)
    fake_scheduler(tmp_path, monkeypatch, 4343)
    for given, countdown in (([], cap), (["--max-requeues", "7"], 7)):
        out = tmp_path / f"eval{countdown}"
        model = ["--weights", str(weights), "--output-dir", str(out)]
        (job,) = submit(["evaluate", "--cluster", "slurm", *given, "--", *model])
        with open(job.paths.submitted_pickle, "rb") as f:
            assert pickle.load(f)._timeout_countdown == countdown


# requeues: the job script asks for them, a stop signal's name decides them, a dead rank may get one -------


def fake_scontrol(tmp_path: Path, monkeypatch, answer: str = "exit 0") -> Path:
    """A stub of SLURM's `scontrol` first on PATH (the scheduler's CLI only; no SLURM runs): it logs its
    arguments, names node01 as the job's host and ends with `answer`. Returns its log."""
    bin_, log = tmp_path / "fake-scontrol", tmp_path / "scontrol.log"
    bin_.mkdir(parents=True)
    (bin_ / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {log}\n[ "$1 $2" = "show hostnames" ] && echo node01\n{answer}\n'
    )
    (bin_ / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    return log


def submitted_script(tmp_path: Path, monkeypatch, what: str, *flags: str) -> list[str]:
    """The job script the launcher's executor hands sbatch for a `what` job (stubs of sbatch and srun)."""
    from launch.__main__ import _COMMAND_JOBS, EvaluateJob, TrainJob, _executor, build_parser

    tmp_path.mkdir(parents=True, exist_ok=True)
    script = fake_scheduler(tmp_path, monkeypatch, 4545)
    args = build_parser().parse_args([what, "--cluster", "slurm", *flags])
    args.setup = ["set -e"]  # a site's set-up line that would end the script when srun fails
    job = {"train": TrainJob, "evaluate": EvaluateJob, **_COMMAND_JOBS}[what](["x"])
    _executor(args, tmp_path / "jobs", 2, 0).submit(job)
    return script.read_text().splitlines()


def test_the_job_script_of_a_job_that_resumes_asks_slurm_to_requeue_it(tmp_path, monkeypatch):
    assert "#SBATCH --requeue" in submitted_script(tmp_path / "t", monkeypatch, "train")
    assert "#SBATCH --requeue" in submitted_script(tmp_path / "e", monkeypatch, "evaluate")
    assert "#SBATCH --requeue" in submitted_script(tmp_path / "p", monkeypatch, "predict")
    assert "#SBATCH --requeue" not in submitted_script(tmp_path / "b", monkeypatch, "benchmark")
    # --sbatch no-requeue is the user's: it wins, a flag without a value as sbatch spells it
    for n, spelling in enumerate(("no-requeue", "no-requeue=")):
        lines = submitted_script(tmp_path / f"n{n}", monkeypatch, "train", "--sbatch", spelling)
        assert [line for line in lines if "requeue" in line] == ["#SBATCH --no-requeue"]


@pytest.mark.parametrize(
    ("status", "runs", "requeues"),
    [
        (137, 2, ["requeue 4545"]),  # a rank killed (SIGKILL, the OOM killer): once, then the cap
        (1, 1, ["requeue 4545"]),  # a rank's crash
        (75, 1, []),  # a run stopped by a signal with its checkpoint (EXIT_STOPPED)
        (143, 1, []),  # SLURM's SIGTERM: it acts on the job itself
        (0, 1, []),
    ],
)
def test_max_failures_requeues_a_job_whose_rank_died_up_to_its_cap(
    tmp_path, monkeypatch, status, runs, requeues
):
    """The launcher's job script, run by bash under stubs of srun (it ends with `status`, as srun does
    when a task died) and scontrol: after srun it requeues the job, counting in the job's folder."""
    import subprocess

    lines = submitted_script(tmp_path, monkeypatch, "train", "--max-failures", "1")
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines.index("set +e") < srun < lines.index("status=$?")  # after the site's `set -e`
    (tmp_path / "fake-bin" / "srun").write_text(f"#!/usr/bin/env bash\nexit {status}\n")
    log = fake_scontrol(tmp_path, monkeypatch)
    (tmp_path / "jobs" / "4545").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLURM_JOB_ID": "4545", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outputs = []
    for _ in range(runs):
        done = subprocess.run(
            ["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == status, done.stderr
        outputs.append(done.stderr.strip().splitlines())
    calls = log.read_text().splitlines() if log.exists() else []
    assert [c for c in calls if c.startswith("requeue")] == requeues
    head = f"autosam2: job 4545: a rank failed (srun's exit status {status})"
    if not requeues:
        assert outputs == [[]] * runs
        return
    assert outputs[0] == [f"{head}; requeueing it (1 of 1): it resumes from its last checkpoint"]
    assert (tmp_path / "jobs" / "4545" / "failure_requeues").read_text() == "1\n"
    if runs > 1:
        assert outputs[1] == [
            f"{head}; not requeueing it: it was requeued after a failure 1 time(s), the cap is 1 "
            "(--max-failures / AUTOSAM2_MAX_FAILURES)"
        ]


def test_after_srun_outside_a_slurm_job_is_one_line(monkeypatch, capsys, tmp_path):
    from autosam2.engine.dist.__main__ import main as dist

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(SystemExit) as leaving:
        dist(["after-srun", "137", "--max-failures", "1", "--count-file", str(tmp_path / "n")])
    assert leaving.value.code == 2 and not (tmp_path / "n").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: after-srun runs in a SLURM job (SLURM_JOB_ID is not set)")


@pytest.mark.parametrize(
    ("count_file", "why"), [("gone/n", "No such file or directory"), ("folder", "Is a directory")]
)
def test_a_failure_count_that_cannot_be_kept_is_one_line_and_no_requeue(
    monkeypatch, capsys, tmp_path, count_file, why
):
    from autosam2.engine.dist.__main__ import main as dist

    scontrol = fake_scontrol(tmp_path, monkeypatch)
    (tmp_path / "folder").mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert dist(["after-srun", "137", "--max-failures", "1", "--count-file", str(tmp_path / count_file)]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    head = "autosam2: job 77: a rank failed (srun's exit status 137)"
    assert line == f"{head}; not requeueing it: {tmp_path / count_file}: {why}"
    assert not scontrol.exists()


def test_without_max_failures_the_job_script_ends_with_srun(tmp_path, monkeypatch):
    lines = submitted_script(tmp_path, monkeypatch, "train")
    assert lines[-1].startswith("srun ") or not lines[-1].strip()
    assert "set +e" not in lines and not [line for line in lines if "after-srun" in line]


@pytest.fixture
def handlers():
    """The process's signal handlers and the stop signals it received, put back after the test."""
    import signal

    from autosam2.engine import stop

    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    came = list(stop._came)
    stop._came.clear()
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        stop._came[:] = came


def run_train_job(tmp_path: Path, monkeypatch, signals: list[str], scontrol: str, rank: int = 0):
    """A TrainJob as submitit runs it in a SLURM task (its own signal handlers in place, SLURM's
    variables set, stubs of scontrol on PATH); the training stands in: its stop signals come (each
    `signals`), then it returns stopped at a step boundary. (the job's SystemExit code or its result,
    scontrol's calls, the submitted pickle's mtime before and after)."""
    import signal

    import submitit
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.utils import DelayedSubmission, JobPaths

    import autosam2.train
    from autosam2.engine import stop
    from autosam2.engine.checkpoint import LoopState
    from autosam2.engine.stop import StopSignal
    from launch.__main__ import TrainJob

    stop._came.clear()  # a fresh task's process: no stop signal came yet
    log = fake_scontrol(tmp_path, monkeypatch, scontrol)
    for name, value in {"SLURM_JOB_ID": "4646", "SLURM_PROCID": str(rank), "RANK": str(rank)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "jobs" / "4646"))

    def stopped_run(argv):
        StopSignal(announce=rank == 0)
        for name in signals:
            signal.raise_signal(getattr(signal, name))
        return LoopState(step=2, stopped=True)

    monkeypatch.setattr(autosam2.train, "run", stopped_run)
    job = TrainJob(["train.max_steps=4"])
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, 3)
    paths = JobPaths(tmp_path / "jobs" / "4646", job_id="4646", task_id=rank)
    paths.folder.mkdir(parents=True)
    delayed.dump(paths.submitted_pickle)
    before = paths.submitted_pickle.stat().st_mtime_ns
    env = submitit.JobEnvironment()
    assert isinstance(env, JobEnvironment) and env.cluster == "slurm"
    env._handle_signals(paths, delayed)  # as submitit's process_job does before it calls the job
    try:
        outcome = delayed.result()
    except SystemExit as leaving:
        outcome = leaving.code
    calls = log.read_text().splitlines() if log.exists() else []
    return outcome, calls, (before, paths.submitted_pickle.stat().st_mtime_ns)


def test_a_requeue_by_slurm_is_not_requeued_again_and_the_log_names_sigterm(
    tmp_path, monkeypatch, capfd, handlers
):
    """`scontrol requeue`: SLURM sends SIGTERM and requeues the job itself; the job checkpoints and every
    task leaves with EXIT_STOPPED, no result, no second requeue, no traceback."""
    outcome, calls, _ = run_train_job(tmp_path, monkeypatch, ["SIGTERM"], "exit 0")
    assert outcome == 75 and calls == []
    err = capfd.readouterr().err
    assert "SIGTERM: stopping at the next step boundary" in err and "Traceback" not in err
    assert "autosam2: SIGTERM: SLURM requeues or ends job 4646 itself" in err and "SIGUSR2" not in err


def test_the_time_limit_signal_requeues_through_submitit_once(tmp_path, monkeypatch, capfd, handlers):
    outcome, calls, (before, after) = run_train_job(tmp_path, monkeypatch, ["SIGUSR2"], "exit 0")
    assert outcome == 75 and calls == ["requeue 4646"] and after > before  # submitit's checkpoint pickle
    err = capfd.readouterr().err
    assert "autosam2: SIGUSR2: requeueing job 4646" in err and "Traceback" not in err


def test_a_failed_requeue_is_one_line_without_a_traceback(tmp_path, monkeypatch, capfd, handlers):
    """submitit's preemption (SIGTERM, then SIGUSR2) asks for a requeue; scontrol refuses it."""
    answer = 'echo "scontrol: error: Job is pending execution" >&2; exit 1'
    outcome, calls, _ = run_train_job(tmp_path, monkeypatch, ["SIGTERM", "SIGUSR2"], answer)
    assert outcome == 75 and calls == ["requeue 4646"]
    err = capfd.readouterr().err
    assert "autosam2: SIGTERM, SIGUSR2: requeueing job 4646" in err and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "requeue failed" in x]
    assert line.startswith("autosam2: job 4646: requeue failed (Command '['scontrol', 'requeue', '4646']'")
    assert line.endswith("what is done is kept: submit the job again to resume")


def test_past_its_time_outs_a_job_returns_stopped_in_one_line(tmp_path, monkeypatch, capfd, handlers):
    """Every requeue used up (--max-requeues 0): no requeue, no traceback, the stopped result."""
    import submitit

    monkeypatch.setattr(
        submitit.core.job_environment.SignalHandler, "has_timed_out", lambda self: True
    )  # the time limit is near, as when SLURM's warning comes
    monkeypatch.setattr(submitit.core.utils.DelayedSubmission, "set_timeout", _no_time_outs)
    outcome, calls, _ = run_train_job(tmp_path, monkeypatch, ["SIGUSR2"], "exit 0")
    assert outcome == {"step": 2, "stopped": True} and calls == []
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert "autosam2: job 4646: Job not requeued because: timed-out too many times. Submit it again" in err


def _no_time_outs(self, timeout_min: int, max_num_timeout: int) -> None:
    self._timeout_min, self._timeout_countdown = timeout_min, 0


def test_another_rank_leaves_the_requeue_to_rank_0(tmp_path, monkeypatch, capfd, handlers):
    outcome, calls, _ = run_train_job(tmp_path, monkeypatch, ["SIGUSR2"], "exit 0", rank=1)
    assert outcome == {"step": 2, "stopped": True} and calls == []
    outcome, calls, _ = run_train_job(tmp_path / "b", monkeypatch, ["SIGTERM"], "exit 0", rank=1)
    assert outcome == 75 and calls == [] and capfd.readouterr().err == ""


def test_train_sbatch_requeues_after_a_dead_rank_up_to_autosam2_max_failures(tmp_path, monkeypatch):
    """launch/train.sbatch under stubs of srun (torchrun's status when a worker was killed: 1) and
    scontrol, AUTOSAM2_MAX_FAILURES=1: the first run requeues the job, the second says why not."""
    import subprocess
    import sys

    bin_ = tmp_path / "fake-bin"
    bin_.mkdir()
    (bin_ / "srun").write_text("#!/usr/bin/env bash\nexit 1\n")
    (bin_ / "srun").chmod(0o755)
    log = fake_scontrol(tmp_path, monkeypatch)
    repo = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {**base, "SLURM_JOB_ID": "4747", "SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1"}
    env.update(PATH=f"{bin_}:{os.environ['PATH']}", AUTOSAM2_PYTHON=sys.executable, PYTHONPATH=str(repo))
    env.update(AUTOSAM2_RDZV_PORT="29500", AUTOSAM2_MAX_REQUEUES="3", AUTOSAM2_MAX_FAILURES="1")
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NAME="autosam2-train")
    runs = [
        subprocess.run(
            ["bash", str(repo / "launch" / "train.sbatch")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [1, 1]
    assert [c for c in log.read_text().splitlines() if c.startswith("requeue")] == ["requeue 4747"]
    head = "autosam2: job 4747: a rank failed (srun's exit status 1)"
    assert runs[0].stderr.strip().splitlines() == [
        f"{head}; requeueing it (1 of 1): it resumes from its last checkpoint"
    ]
    assert runs[1].stderr.strip().splitlines() == [
        f"{head}; not requeueing it: it was requeued after a failure 1 time(s), the cap is 1 "
        "(--max-failures / AUTOSAM2_MAX_FAILURES)"
    ]
    assert (tmp_path / "autosam2-train-4747.failures").read_text() == "1\n"
    env["AUTOSAM2_MAX_FAILURES"] = "x"
    bad = subprocess.run(["bash", str(repo / "launch" / "train.sbatch")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "autosam2: AUTOSAM2_MAX_FAILURES=x is not a whole number"
    )


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


def test_a_second_training_submission_into_a_reserved_directory_is_refused_in_one_line(
    train_data, tmp_path, monkeypatch, capsys
):
    """The output directory is reserved at submission (OUT/run.reserved): while the reserving job is
    pending or running (a stub of SLURM's squeue says so) a second submission is one line naming the job,
    and nothing is written; a job that has ended leaves a reservation the next submission takes over,
    saying so once."""
    import json

    from autosam2.engine.run_lock import RESERVATION_NAME, RESERVATION_VARIABLE
    from launch.__main__ import main

    monkeypatch.setenv(RESERVATION_VARIABLE, "")  # the launcher sets it for its job; put back after
    out = tmp_path / "run"
    args = [
        "train",
        "--cluster",
        "debug",
        "--",
        *train_overrides(train_data, out, **{"tracking.enabled": "false"}),
    ]
    (job,) = submit(args)  # a debug job runs when waited for: not here
    reservation = json.loads((out / RESERVATION_NAME).read_text())
    assert reservation["job_id"] == str(job.job_id) and reservation["cluster"] == "debug"
    assert os.environ[RESERVATION_VARIABLE] == reservation["token"]
    reservation.update(job_id="77", cluster="slurm")  # as if job 77 were waiting in SLURM's queue
    (out / RESERVATION_NAME).write_text(json.dumps(reservation))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho PENDING\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    before = sorted(p.name for p in (out / "jobs").iterdir())
    capsys.readouterr()
    assert main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"launch: {out}: reserved by job 77 (slurm), submitted from ")
    assert "pending or running" in line
    assert json.loads((out / RESERVATION_NAME).read_text())["job_id"] == "77"
    assert sorted(p.name for p in (out / "jobs").iterdir()) == before  # no second job folder
    squeue.write_text("#!/bin/sh\necho COMPLETED\n")
    (job,) = submit(args)
    said = capsys.readouterr().out
    assert said.count("took over the reservation of job 77 (slurm)") == 1
    assert json.loads((out / RESERVATION_NAME).read_text())["job_id"] == str(job.job_id)


@pytest.mark.parametrize(
    ("what", "flag"), [("predict", "weights"), ("evaluate", "checkpoint"), ("benchmark", "weights")]
)
def test_a_missing_weights_or_checkpoint_file_is_refused_at_submission_in_one_line(
    tmp_path, sunseg_split, what, flag, capsys
):
    from launch.__main__ import main

    (tmp_path / "w.pt").write_bytes(b"w")
    files = {"weights": str(tmp_path / "w.pt"), flag: str(tmp_path / "gone.pt")}
    model = [f"--{name}={path}" for name, path in files.items()]
    out = ["--output-dir", str(tmp_path / "out")]
    args = {
        "predict": [str(sunseg_split / "TestEasyDataset" / "Seen" / "Frame" / "case2_1"), *model, *out],
        "evaluate": ["--data", str(sunseg_split), "--split", "TestEasyDataset/Seen", *model, *out],
        "benchmark": [
            "sunseg",
            "--data",
            str(sunseg_split),
            "--splits",
            "TestEasyDataset/Seen",
            *model,
            *out,
        ],
    }[what]
    assert main([what, "--cluster", "local", "--", *args]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"launch: --{flag} {tmp_path / 'gone.pt'}: file not found"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_a_job_folder_that_is_a_file_is_refused_in_one_line_and_kept(tmp_path, sunseg_split, weights, capsys):
    from launch.__main__ import main

    (tmp_path / "logs").write_text("mine")
    args = ["sunseg", "--data", str(sunseg_split), "--splits", "TestEasyDataset/Seen"]
    args += ["--weights", str(weights), "--output-dir", str(tmp_path / "out")]
    assert main(["benchmark", "--cluster", "local", "--folder", str(tmp_path / "logs"), "--", *args]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line
        == f"launch: {tmp_path / 'logs'}: is a file, not a folder; refusing to put the job's logs there (--folder)"
    )
    assert (tmp_path / "logs").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "logs"
    ]


@pytest.mark.parametrize("uri", ["not-a-uri", "http://127.0.0.1:1"])
def test_a_tracking_store_that_refuses_or_is_down_is_one_line_before_a_training_job_and_nothing_is_made(
    train_data, tmp_path, monkeypatch, capsys, uri
):
    from launch.__main__ import main

    fake_scheduler(tmp_path, monkeypatch, 4646)
    out = tmp_path / "runs" / "run"
    argv = ["train", "--tracking-uri", uri, "--", *train_overrides(train_data, out)]
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"launch: tracking store {uri}: ")
    assert line.endswith(
        "; start it, name another (--tracking-uri, MLFLOW_TRACKING_URI) or set tracking.enabled=false"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "job.sh").exists()


def test_a_debug_job_runs_at_once_from_the_command_line(tiny_root_pristine, tmp_path, capsys):
    """`--cluster debug` runs the job in the launcher's process: from the command line it has run when the
    launcher returns, --wait or not (submitit's debug jobs run only when waited for)."""
    from launch.__main__ import main
    from shards.verify import verify

    out = tmp_path / "shards"
    build = [str(tiny_root_pristine), "--split", "valid", "--out", str(out)]
    assert main(["shard", "--cluster", "debug", "--", *build]) == 0
    assert verify(out) == [] and any(out.glob("*.tar"))
    assert "job " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--steps", "0", "4"], "argument --steps: 0 must be at least 1"),
        (["--steps", "-2", "4"], "argument --steps: -2 must be at least 1"),
        (["--steps", "4", "4"], "argument --steps: the long run's 4 must be more than the short run's 4"),
        (["--steps", "12", "4"], "argument --steps: the long run's 4 must be more than the short run's 12"),
        (["--steps", "4"], "argument --steps: expected 2 arguments"),
        (["--threads", "0"], "argument --threads: 0 must be at least 1"),
    ],
)
def test_hosts_bench_refuses_bad_arguments_in_one_line_before_the_cluster_starts(
    argv, problem, capsys, monkeypatch
):
    import subprocess

    from launch import hosts_bench

    def no_cluster(*args, **kwargs):
        raise AssertionError("the cluster started")

    monkeypatch.setattr(subprocess, "run", no_cluster)
    with pytest.raises(SystemExit) as exited:
        hosts_bench.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"python launch/hosts_bench.py: error: {problem}"
