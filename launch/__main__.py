"""`python -m launch WHAT --cluster slurm|local|debug [options] -- [the command's args]`.

Submits through submitit: training as a Checkpointable job (one task per GPU; each task maps SLURM's
variables to torch.distributed's as `autosam2 train` does under srun), evaluation and benchmarks as one
job whose ranks split the sequences, prediction as one job, sharding as a job array plus a merge job.
Arguments after `--` are parsed once, by the command's own parser. The job folder, with every task's
logs, lives under the run's output directory (training), or beside it.

--time takes sbatch's formats; the site's set-up lines (module load, a venv's activate) come from the
YAML file AUTOSAM2_SITE names (key setup: a list of lines) and --setup, and run in the job script
before srun.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from autosam2.arguments import non_negative_int, positive_float, positive_int
from launch.sbatch import SITE_VARIABLE, TIME_FORMATS, sbatch_minutes, sbatch_parameter, site_setup


class TrainJob(submitit.helpers.Checkpointable):
    """`autosam2 train ARGS` on every task. A stop signal checkpoints the run at the next step boundary;
    then the signals that came decide (`_after_stop`). A requeued job resumes from the checkpoint
    (train.resume=auto)."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> dict[str, Any]:
        requeue = signal.getsignal(_requeue_signal())  # submitit's checkpoint-and-requeue handler
        from autosam2.train import run

        state = run(self.argv)  # installs its own SIGUSR2/SIGTERM/SIGINT handlers: stop at a step boundary
        if state.stopped:
            _after_stop(requeue)
            return {"step": state.step, "stopped": True}
        return {"step": state.step, "stopped": False, "best_dice": state.best_dice}


def _requeue_signal() -> signal.Signals:
    """The signal on which submitit requeues a job: SLURM's time-limit warning (--signal-delay-s) and a
    preemption's (SIGUSR2, unless SUBMITIT_PREEMPT_SIGNAL names another)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


# a preemption as submitit signals it: SIGTERM, then its requeue signal a moment later
PREEMPTION_GAP_S = 2.0


def _signals_came(wait_s: float) -> tuple[int, ...]:
    """The stop signals this process received; when submitit's requeue signal is not among them, those
    that came within `wait_s` seconds (every task waits alike, so none leaves before the others)."""
    import time

    from autosam2.engine.stop import signals_received

    deadline = time.monotonic() + wait_s
    while _requeue_signal() not in signals_received() and time.monotonic() < deadline:
        time.sleep(0.05)
    return signals_received()


def _after_stop(requeue: Any) -> None:
    """A training job stopped at a step boundary with its checkpoint. When submitit's requeue signal came,
    rank 0 hands over to submitit, which requeues the job (the TrainJob, pickled again) up to its count
    of time-outs; the other ranks return. Without it (waited for `PREEMPTION_GAP_S` under SLURM), under
    SLURM (SIGTERM: `scontrol requeue`, `scancel`, the time limit itself; SLURM requeues or ends the
    job on its own) every task leaves with EXIT_STOPPED and no result, which the job's next run, if
    any, writes; local and debug jobs return the stopped result."""
    from autosam2.engine.stop import EXIT_STOPPED, signal_names

    slurm, main = os.environ.get("SUBMITIT_EXECUTOR") == "slurm", int(os.environ.get("RANK", "0")) == 0
    job = os.environ.get("SLURM_JOB_ID", "?")
    came = _signals_came(PREEMPTION_GAP_S if slurm else 0.0)
    if _requeue_signal() in came:
        if main and callable(requeue):
            print(f"autosam2: {signal_names(came)}: requeueing job {job}", file=sys.stderr, flush=True)
            _hand_over(requeue, job)
        return
    if not slurm:
        return
    if main:
        print(
            f"autosam2: {signal_names(came)}: SLURM requeues or ends job {job} itself; the checkpoint is "
            "saved, this run leaves without a result",
            file=sys.stderr,
            flush=True,
        )
    raise SystemExit(EXIT_STOPPED)


def _hand_over(requeue: Any, job: str) -> None:
    """Call submitit's requeue handler (checkpoint, `scontrol requeue`, exit). Under SLURM the task then
    exits with EXIT_STOPPED (a stop, not a failure: --max-failures leaves it alone). A job past its
    count of time-outs (--max-requeues) returns its stopped result; a requeue that fails is one line
    and EXIT_STOPPED; either way the checkpoint is kept for a new submission."""
    import subprocess

    from autosam2.engine.stop import EXIT_STOPPED

    slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    try:
        requeue(_requeue_signal(), None)
    except SystemExit:
        if slurm:
            raise SystemExit(EXIT_STOPPED) from None
        raise  # the local executor requeues on its own exit status
    except submitit.core.utils.UncompletedJobError as err:  # "Job not requeued because: ..."
        print(f"autosam2: job {job}: {err} Submit it again to resume", file=sys.stderr, flush=True)
    except (OSError, subprocess.SubprocessError) as err:
        print(
            f"autosam2: job {job}: requeue failed ({err}); what is done is kept: submit the job again "
            "to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_STOPPED) from None


class _CommandJob:
    """`autosam2 COMMAND ARGS` on every task: the command's own `main`, as the command table names it."""

    command = ""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> int:
        import importlib

        from autosam2.commands import AUTOSAM2, commands_of

        module, function = commands_of(AUTOSAM2)[self.command].target.split(":")
        return getattr(importlib.import_module(module), function)(self.argv)


class EvaluateJob(_CommandJob, submitit.helpers.Checkpointable):
    """`autosam2 evaluate ARGS` on every task. A stop signal ends each rank's run at the end of its
    sequence in progress (the finished ones are kept in the output folder); then the signals that came
    decide (`_after_stop`). The job goes on with --resume, and without --overwrite (which would start
    the folder again), both when submitit requeues it (`checkpoint`) and when SLURM does
    (SLURM_RESTART_COUNT): the requeued job skips the finished sequences."""

    command = "evaluate"

    def __call__(self) -> int:
        from autosam2.engine.stop import EXIT_STOPPED

        requeue = signal.getsignal(_requeue_signal())  # submitit's checkpoint-and-requeue handler
        if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            self.argv = self.resumed(self.argv)
        code = super().__call__()  # installs its own stop handlers: stop at a sequence's end
        if code == EXIT_STOPPED:
            _after_stop(requeue)
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.resumed(self.argv)))

    @staticmethod
    def resumed(argv: list[str]) -> list[str]:
        """`argv` of the run that goes on: --resume, no --overwrite."""
        kept = [a for a in argv if a != "--overwrite"]
        return kept if "--resume" in kept else [*kept, "--resume"]


class PredictJob(EvaluateJob):
    """`autosam2 predict ARGS` on every task, as under srun: the ranks split the sequences; stopped and
    requeued like an evaluation, it goes on with --resume."""

    command = "predict"


class BenchmarkJob(_CommandJob):
    """`autosam2 benchmark ARGS` on every task: the ranks split each split's cases, rank 0 writes the table."""

    command = "benchmark"


_COMMAND_JOBS: dict[str, type[_CommandJob]] = {"predict": PredictJob, "benchmark": BenchmarkJob}


def shard_part(argv: list[str], index: int | None, count: int) -> int:
    """One array task: the disjoint part `index` of `count`; with index None, the merge step."""
    from shards.__main__ import build_parser, run

    if index is None:
        build = build_parser().parse_args(["build", *argv])
        again = ["--overwrite"] if build.overwrite else []
        return run(build_parser().parse_args(["merge", "--output-dir", str(build.output_dir), *again]))
    return run(
        build_parser().parse_args(["build", *argv, "--shard-index", str(index), "--num-shards", str(count)])
    )


def build_parser() -> argparse.ArgumentParser:
    from autosam2.arguments import add_output_dir
    from autosam2.commands import LAUNCH, commands_of

    p = argparse.ArgumentParser(
        prog=LAUNCH,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    jobs = commands_of(LAUNCH)
    p.add_argument(
        "what", choices=list(jobs), help="; ".join(f"{name}: {job.help}" for name, job in jobs.items())
    )
    p.add_argument(
        "--cluster",
        choices=["slurm", "local", "debug"],
        default="slurm",
        help="slurm; local: subprocesses here; debug: in this process, at once",
    )
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument(
        "--gpus-per-node", type=non_negative_int, default=None, help="GPUs per node, one task each (0: none)"
    )
    p.add_argument(
        "--tasks-per-node",
        type=positive_int,
        default=None,
        help="tasks per node without GPUs (CPU runs); default: --gpus-per-node or 1",
    )
    p.add_argument("--cpus-per-task", type=positive_int, default=8)
    p.add_argument("--mem-gb", type=positive_float, default=None)
    p.add_argument(
        "--time",
        type=sbatch_minutes,
        default=60,
        help=f"time limit, as sbatch takes it: {TIME_FORMATS} (a bare number is minutes; seconds round "
        "up to a minute; default %(default)s minutes)",
    )
    _add_slurm_arguments(p)
    p.add_argument("--num-shards", type=positive_int, default=4, help="shard: array tasks (disjoint parts)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (e.g. http://login01:5000); default $MLFLOW_TRACKING_URI, else OUTPUT_DIR/../mlflow.db",
    )
    p.add_argument("--name", default=None, help="job name (default: autosam2-WHAT)")
    add_output_dir(
        p,
        "--folder",
        default=None,
        help="the job folder: submitit's pickles and every task's logs (default: the command's "
        "OUTPUT_DIR/jobs (train); OUTPUT_DIR.jobs beside it (the others))",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print the result")
    p.epilog = (
        "After --: the arguments of `autosam2 train` / `evaluate` / `predict` / `benchmark`, or of "
        "`python -m shards build` (shard)."
    )
    return p


def _add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """What SLURM is asked for beyond the resources: where, on whose account, what the job script sets
    up, and how a job is requeued."""
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument(
        "--sbatch",
        action="append",
        type=sbatch_parameter,
        default=[],
        metavar="KEY[=VALUE]",
        help="extra #SBATCH parameter (repeatable): KEY=VALUE, or KEY alone for a flag (--sbatch exclusive)",
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help=f"a shell line the job script runs before srun (repeatable), after those of the site file "
        f"{SITE_VARIABLE} names, e.g. --setup 'module load cuda/12.4'",
    )
    p.add_argument(
        "--max-requeues",
        type=non_negative_int,
        default=None,
        help="time-limit requeues of a training job (preemptions always requeue); default: the cap "
        "the sbatch templates keep, which `python -m autosam2.engine.dist max-requeues` prints",
    )
    p.add_argument(
        "--max-failures",
        type=non_negative_int,
        default=0,
        help="times a training job is requeued after a rank died (a crash, the OOM killer); it resumes "
        "from its last checkpoint (default %(default)s: the job fails)",
    )
    p.add_argument(
        "--signal-delay-s",
        type=non_negative_int,
        default=120,
        help="SIGUSR2 this many seconds before the time limit",
    )


def _executor(args: argparse.Namespace, folder: Path, tasks: int, gpus: int) -> submitit.AutoExecutor:
    from autosam2.engine.dist.slurm import MAX_REQUEUES  # read here: it loads torch, which --help need not

    requeues = MAX_REQUEUES if args.max_requeues is None else args.max_requeues
    executor = submitit.AutoExecutor(
        folder=str(folder / "%j"), cluster=args.cluster, slurm_max_num_timeout=requeues
    )
    extra: dict[str, Any] = {}
    for item in args.sbatch:  # KEY=VALUE: --KEY=VALUE; KEY or KEY=: the flag alone (--exclusive)
        key, _, value = item.partition("=")
        extra[key.strip().lstrip("-")] = value or True
    params: dict[str, Any] = {
        "name": args.name or f"autosam2-{args.what}",
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.time,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_additional_parameters": extra,
        "slurm_setup": args.setup,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.what == "train":  # one task failing ends the others instead of leaving them in a collective
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    _requeue_lines(args, folder, params)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**params)
    return executor


def _resumes(what: str) -> bool:
    """Whether a `what` job goes on from where a requeued run of it stopped (its job is Checkpointable)."""
    job = {"train": TrainJob, "evaluate": EvaluateJob, **_COMMAND_JOBS}.get(what)
    return job is not None and issubclass(job, submitit.helpers.Checkpointable)


def _requeue_lines(args: argparse.Namespace, folder: Path, params: dict[str, Any]) -> None:
    """A job that resumes asks SLURM to requeue it (#SBATCH --requeue: a node failure, `scontrol
    requeue`), whatever the site's JobRequeue default. With --max-failures N its job script, once srun
    has ended, requeues it when a rank died, up to N times (`python -m autosam2.engine.dist after-srun`,
    the count kept in the job's folder); a rank killed outright (SIGKILL) runs no handler, so the
    batch shell decides."""
    extra = params["slurm_additional_parameters"]
    if not _resumes(args.what):
        if args.max_failures:
            print(f"--max-failures applies to jobs that resume; this {args.what} job runs without it")
        return
    if "no-requeue" not in extra and "no_requeue" not in extra:
        extra.setdefault("requeue", True)
    if not args.max_failures:
        return
    # srun's status decides below: a `set -e` among the set-up lines must not end the script first
    params["slurm_setup"] = [*params["slurm_setup"], "set +e"]
    count = shlex.quote(str(folder)) + '/"$SLURM_JOB_ID"/failure_requeues'
    params["slurm_teardown"] = [
        "status=$?",
        f'{shlex.quote(sys.executable)} -m autosam2.engine.dist after-srun "$status" '
        f"--max-failures {args.max_failures} --count-file {count}",
        'exit "$status"',
    ]


def _report(job: submitit.Job, what: str, tasks: int) -> None:
    paths = job.paths
    print(
        f"submitted {what} job {job.job_id} ({tasks} task(s)) to {type(job).__name__.replace('Job', '').lower() or 'debug'}"
    )
    print(f"  logs:   {paths.stdout}  (task 0; one file per task)")
    print(f"  follow: tail -f {shlex.quote(str(paths.stdout))}")
    if isinstance(job, submitit.SlurmJob):
        print(f"  status: squeue -j {job.job_id}   |   sacct -j {job.job_id}")


def _wait(job: submitit.Job) -> Any:
    """Task 0's result of a job; a failed job is one JobFailed line: the job, its error's last line, its log
    (submitit's own error carries the whole trace, which the log holds too)."""
    from autosam2.errors import JobFailed

    try:
        return job.results()[0]
    except submitit.core.utils.UncompletedJobError as err:
        parts = str(err).split("-" * 22)  # submitit puts the job's trace between two such rules
        trace = (parts[1] if len(parts) > 2 else str(err)).strip().splitlines()
        last = trace[-1].strip() if trace else "no error recorded"
        raise JobFailed(f"job {job.job_id} failed: {last}; log: {job.paths.stderr}") from err


def _output_dir_of(what: str, argv: list[str]) -> Path:
    """Where an evaluate, predict, benchmark or shard job writes (train's comes from its config), read by
    its own parser and claimed before the job waits in the queue: our own kind of output only, apart
    from the input."""
    from autosam2.data.sample_format import SHARD_SET
    from autosam2.outputs import claim_shared

    if what in ("predict", "benchmark"):
        return _inputs_checked(what, argv)
    if what == "evaluate":
        from autosam2.evaluate import build_parser as evaluate_parser
        from autosam2.evaluate import claim_output, resolve_folder

        args = evaluate_parser().parse_args(argv)
        resolve_folder(args)  # a dataset folder in no layout, or without the split, fails here
        _model_files_found(args)
        return claim_output(args).out
    from autosam2.data.sample_format import MANIFEST
    from autosam2.errors import OutputRefused
    from shards.__main__ import build_parser as shard_parser
    from shards.writer import scan_root

    args = shard_parser().parse_args(["build", *argv])
    scan_root(args.root, args.split, args.layout)
    out = claim_shared(args.output_dir, SHARD_SET, [args.root])
    if (out / MANIFEST).exists() and not args.overwrite:
        raise OutputRefused(f"{out / MANIFEST}: shard set already built; pass --overwrite to rebuild")
    return out


def _inputs_checked(what: str, argv: list[str]) -> Path:
    """A predict or benchmark job's output folder, claimed, once its inputs are found as the command
    itself finds them (file names only, and the model files read: a missing input or split, or a
    wrong weights file, fails here, not in the queue)."""
    from autosam2.outputs import BENCHMARK, claim

    if what == "predict":
        from autosam2.predict import build_parser as predict_parser
        from autosam2.predict import claim_output, read_videos

        args = predict_parser().parse_args(argv)
        read_videos(args.input, args.layout, args.split)
        _model_files_found(args)
        return claim_output(args).out
    from autosam2.benchmark import _splits
    from autosam2.benchmark import build_parser as benchmark_parser

    args = benchmark_parser().parse_args(argv)
    _splits(args)
    _model_files_found(args)
    return claim(args.output_dir, BENCHMARK, args.overwrite, [args.data, args.weights, args.checkpoint])


def _model_files_found(args: argparse.Namespace) -> None:
    """The --weights and --checkpoint files a scoring job reads are there and hold what the job will
    load (read as the command reads them, memory-mapped, no model built: `model_files`); a missing or
    wrong one is one CheckpointError naming it."""
    from autosam2.errors import CheckpointError
    from autosam2.model.weights import model_files

    for flag in ("weights", "checkpoint"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            found = "a folder, not a file" if Path(path).is_dir() else "file not found"
            raise CheckpointError(f"--{flag} {path}: {found}")
    model_files(args.weights, args.checkpoint)


def _without_credentials(argv: list[str]) -> list[str]:
    """`argv` with the ``user:password@`` of tracking URIs (``tracking.uri=...``, ``--tracking-uri``)
    moved into this process's environment, which the job inherits."""
    from autosam2.tracking import take_uri_credentials

    out, value_of_flag = [], False
    for item in argv:
        if value_of_flag:
            item, value_of_flag = take_uri_credentials(item), False
        elif item.startswith("tracking.uri="):
            item = "tracking.uri=" + take_uri_credentials(item.split("=", 1)[1])
        elif item.startswith("--tracking-uri="):
            item = "--tracking-uri=" + take_uri_credentials(item.split("=", 1)[1])
        elif item == "--tracking-uri":
            value_of_flag = True
        out.append(item)
    return out


def submit(argv: Sequence[str] | None = None, run_debug: bool = False) -> list[submitit.Job]:
    """Submit the job(s) `argv` asks for; wait for them with --wait, and for a debug job (which runs in this
    process only when waited for) with `run_debug`, as the command line does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = build_parser().parse_args(argv[:split]), argv[split + 1 :]
    if args.what == "train" and args.tracking_uri:
        rest.append(f"tracking.uri={args.tracking_uri}")
    # a password in a URI goes to the job through the environment (sbatch and submitit's local
    # executor pass it on), never in its pickled arguments
    rest = _without_credentials(rest)
    args.setup = [*site_setup(), *args.setup]  # a bad site file is one line before anything is made
    if args.setup and args.cluster != "slurm":
        print(
            f"set-up lines ({len(args.setup)}) run in SLURM's job script only; "
            f"--cluster {args.cluster} runs without them"
        )
    cfg, out = _checked(args.what, rest)
    # the output folder of evaluate, predict and benchmark holds their outputs only (sequence by
    # sequence, then the figures) and a shard set its shards only: their logs go beside them
    default = out / "jobs" if args.what == "train" else out.with_name(f"{out.name}.jobs")
    folder = Path(args.output_dir) if args.output_dir else default
    from autosam2.atomic import make_folders, remove_empty
    from autosam2.errors import OutputRefused

    if folder.exists() and not folder.is_dir():
        raise OutputRefused(
            f"{folder}: is a file, not a folder; refusing to put the job's logs there (--folder)"
        )

    made = make_folders(folder)
    jobs: list[submitit.Job] = []
    reservation = None
    try:
        reservation = _reserve(args, out)
        _submit_jobs(args, rest, cfg, out, folder, jobs)
    except BaseException as err:
        if isinstance(err, OSError) and err.filename is None:  # submitit's own writes name no file
            err.filename = str(folder)
        if not jobs and reservation is not None:
            reservation.cancel()
        if not jobs and made:  # nothing was submitted: the job folder made for it goes
            shutil.rmtree(folder, ignore_errors=True)
            remove_empty(made[1:])
        raise
    if reservation is not None:
        reservation.set_job(str(jobs[0].job_id))
    if args.wait or (run_debug and args.cluster == "debug"):
        for job in jobs:
            print(f"job {job.job_id}: {_wait(job)}")  # task 0's result (every task returns one)
    return jobs


def _reserve(args: argparse.Namespace, out: Path):
    """A training job's output folder reserved before it is submitted (`run_lock.reserve`: refused in one
    OutputDirInUse line while another submission's job is pending or running); the job finds its own
    reservation by the token this process passes on in its environment. None for the other commands."""
    if args.what != "train":
        return None
    from autosam2.engine.run_lock import RESERVATION_VARIABLE, reserve

    out.mkdir(parents=True, exist_ok=True)
    reservation = reserve(out, args.cluster)
    if reservation.took_over:
        print(f"note: {reservation.took_over}")
    os.environ[RESERVATION_VARIABLE] = reservation.record["token"]  # sbatch and submitit pass it on
    return reservation


def _checked(what: str, rest: list[str]):
    """Before the job waits in the queue: the train config, every input and the output folder (no live
    run in it, and no other submission's job pending or running for it; for evaluate and shard, our own
    kind of output only). Returns (train config, output)."""
    if what != "train":
        return None, _output_dir_of(what, rest).resolve()
    from autosam2.engine.inputs import check_inputs
    from autosam2.engine.run_lock import check_free, check_reserved
    from autosam2.train import parse_config

    cfg = parse_config(rest)
    check_inputs(cfg)
    out = Path(cfg.train.output_dir).resolve()
    check_free(out)
    check_reserved(out)
    return cfg, out


def _experiment_made(store) -> str:
    """`ensure_experiment` in the store a training job logs to; a store that cannot be reached or that
    MLflow refuses is one ConfigError naming it, before anything is submitted."""
    from mlflow.exceptions import MlflowException

    from autosam2.config import ConfigError
    from autosam2.tracking import ensure_experiment, redact_uri

    try:
        return ensure_experiment(store.uri, store.experiment)
    except MlflowException as err:
        first = redact_uri(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise ConfigError(
            f"tracking store {redact_uri(store.uri)}: {first[:300]}; start it, name another "
            "(--tracking-uri, MLFLOW_TRACKING_URI) or set tracking.enabled=false"
        ) from err


def _submit_jobs(args, rest: list[str], cfg, out: Path, folder: Path, jobs: list[submitit.Job]) -> None:
    """Submit what `args.what` asks for, appending each job to `jobs` as it is submitted."""
    gpus = args.gpus_per_node or 0
    tasks = args.tasks_per_node or gpus or 1
    if args.what == "train":
        from autosam2.tracking import choose_store, read_run

        if cfg.tracking.enabled:
            # created once here, so ranks (and array tasks) never race to create it
            out.mkdir(parents=True, exist_ok=True)
            store = choose_store(cfg.tracking.uri, cfg.tracking.experiment, out, read_run(out))
            experiment_id = _experiment_made(store)
            print(f"MLflow experiment {store.experiment!r} ({experiment_id}) at {store.uri}")
            # the job logs where this says, whatever environment the site's sbatch passes on
            rest = [*rest, f"tracking.uri={store.uri}", f"tracking.experiment={store.experiment}"]
        jobs.append(_executor(args, folder, tasks, gpus).submit(TrainJob(rest)))
        _report(jobs[-1], "train", tasks * args.nodes)
    elif args.what == "evaluate":
        # ranks split the sequences; rank 0 gathers the metrics and writes the output folder
        jobs.append(_executor(args, folder, tasks, gpus).submit(EvaluateJob(rest)))
        _report(jobs[-1], "evaluate", tasks * args.nodes)
    elif args.what in _COMMAND_JOBS:
        jobs.append(_executor(args, folder, tasks, gpus).submit(_COMMAND_JOBS[args.what](rest)))
        _report(jobs[-1], args.what, tasks * args.nodes)
    else:
        executor = _executor(args, folder, 1, 0)
        count = args.num_shards
        jobs += executor.map_array(shard_part, [rest] * count, list(range(count)), [count] * count)
        print(f"submitted shard array {jobs[0].job_id.split('_')[0]} ({count} tasks), logs in {folder}")
        if isinstance(jobs[0], submitit.SlurmJob):
            executor.update_parameters(slurm_dependency=f"afterok:{jobs[0].job_id.split('_')[0]}")
        else:
            for job in list(jobs):  # no dependencies outside SLURM: the parts must be done before the merge
                _wait(job)
        jobs.append(executor.submit(shard_part, rest, None, count))
        _report(jobs[-1], "merge", 1)


def main(argv: Sequence[str] | None = None) -> int:
    from autosam2.errors import run_command

    def submitted() -> int:
        submit(argv, run_debug=True)
        return 0

    return run_command("launch", submitted)


if __name__ == "__main__":
    sys.exit(main())
