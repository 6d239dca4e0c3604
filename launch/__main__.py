"""`python -m launch WHAT --cluster slurm|local|debug [options] -- [the command's args]`.

Submits through submitit: training as a Checkpointable job (one task per GPU; each task maps SLURM's
variables to torch.distributed's as `autosam2 train` does under srun), evaluation as one task, sharding as
a job array plus a merge job. Arguments after `--` are parsed once, by the command's own parser.
The job folder, with every task's logs, lives under the run's output directory.
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

from autosam2.arguments import non_negative_int, positive_int


class TrainJob(submitit.helpers.Checkpointable):
    """`autosam2 train ARGS` on every task. On SLURM's time-limit or preemption signal the run
    checkpoints at the next step boundary, then rank 0 hands over to submitit, which requeues the job
    (this object, pickled again); the requeued job resumes from the checkpoint (train.resume=auto)."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> dict[str, Any]:
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        from autosam2.train import run

        state = run(self.argv)  # installs its own SIGUSR2/SIGTERM/SIGINT handlers: stop at a step boundary
        if state.stopped:
            if int(os.environ.get("RANK", "0")) == 0 and callable(requeue):
                requeue(signal.SIGUSR2, None)  # calls self.checkpoint(), requeues, exits
            return {"step": state.step, "stopped": True}
        return {"step": state.step, "stopped": False, "best_dice": state.best_dice}


class EvaluateJob:
    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> int:
        from autosam2.evaluate import main

        return main(self.argv)


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
        help="slurm; local: subprocesses here; debug: in this process",
    )
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument(
        "--gpus-per-node", type=non_negative_int, default=None, help="GPUs per node, one task each (0: none)"
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="tasks per node without GPUs (CPU runs); default: --gpus-per-node or 1",
    )
    p.add_argument("--cpus-per-task", type=positive_int, default=8)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--time", type=positive_int, default=60, help="time limit in minutes")
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
        "OUTPUT_DIR/jobs; evaluate and shard: OUTPUT_DIR.jobs beside it)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print the result")
    p.epilog = "After --: the arguments of `autosam2 train` / `autosam2 evaluate`, or of `python -m shards build` (shard)."
    return p


def _add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """What SLURM is asked for beyond the resources: where, on whose account, and how a job is requeued."""
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra #SBATCH parameter (repeatable), e.g. --sbatch exclusive=",
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="time-limit requeues of a training job (preemptions always requeue)",
    )
    p.add_argument(
        "--signal-delay-s", type=int, default=120, help="SIGUSR2 this many seconds before the time limit"
    )


def _executor(args: argparse.Namespace, folder: Path, tasks: int, gpus: int) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(
        folder=str(folder / "%j"), cluster=args.cluster, slurm_max_num_timeout=args.max_requeues
    )
    extra: dict[str, Any] = {}
    for item in args.sbatch:
        key, _, value = item.partition("=")
        extra[key.strip().lstrip("-")] = value
    params: dict[str, Any] = {
        "name": args.name or f"autosam2-{args.what}",
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.time,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_additional_parameters": extra,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.what == "train":  # one task failing ends the others instead of leaving them in a collective
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**params)
    return executor


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
    """Where an evaluate or shard job writes (train's comes from its config), read by its own parser and
    claimed before the job waits in the queue: our own kind of output only, apart from the input."""
    from autosam2.data.sample_format import SHARD_SET
    from autosam2.outputs import EVALUATION, claim, claim_shared

    if what == "evaluate":
        from autosam2.evaluate import build_parser as evaluate_parser
        from autosam2.evaluate import resolve_folder

        args = evaluate_parser().parse_args(argv)
        resolve_folder(args)  # a dataset folder in no layout, or without the split, fails here
        inputs = [args.data, args.weights, args.checkpoint, args.episodes]
        return claim(args.output_dir, EVALUATION, args.overwrite, inputs)
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


def submit(argv: Sequence[str] | None = None) -> list[submitit.Job]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = build_parser().parse_args(argv[:split]), argv[split + 1 :]
    if args.what == "train" and args.tracking_uri:
        rest.append(f"tracking.uri={args.tracking_uri}")
    # a password in a URI goes to the job through the environment (sbatch and submitit's local
    # executor pass it on), never in its pickled arguments
    rest = _without_credentials(rest)
    cfg, out = _checked(args.what, rest)
    # evaluate's output folder appears whole when it is done (a renamed temp folder) and a shard set holds
    # its shards only: their logs go beside them
    default = out / "jobs" if args.what == "train" else out.with_name(f"{out.name}.jobs")
    folder = Path(args.output_dir) if args.output_dir else default
    from autosam2.atomic import make_folders, remove_empty

    made = make_folders(folder)
    jobs: list[submitit.Job] = []
    try:
        _submit_jobs(args, rest, cfg, out, folder, jobs)
    except OSError as err:
        if err.filename is None:  # submitit's own writes (the job's pickle) name no file
            err.filename = str(folder)
        if not jobs and made:  # nothing was submitted: the job folder made for it goes
            shutil.rmtree(folder, ignore_errors=True)
            remove_empty(made[1:])
        raise
    if args.wait:
        for job in jobs:
            print(f"job {job.job_id}: {_wait(job)}")  # task 0's result (every task returns one)
    return jobs


def _checked(what: str, rest: list[str]):
    """Before the job waits in the queue: the train config, every input and the output folder (no live
    run in it; for evaluate and shard, our own kind of output only). Returns (train config, output)."""
    if what != "train":
        return None, _output_dir_of(what, rest).resolve()
    from autosam2.engine.inputs import check_inputs
    from autosam2.engine.run_lock import check_free
    from autosam2.train import parse_config

    cfg = parse_config(rest)
    check_inputs(cfg)
    out = Path(cfg.train.output_dir).resolve()
    check_free(out)
    return cfg, out


def _submit_jobs(args, rest: list[str], cfg, out: Path, folder: Path, jobs: list[submitit.Job]) -> None:
    """Submit what `args.what` asks for, appending each job to `jobs` as it is submitted."""
    gpus = args.gpus_per_node or 0
    tasks = args.tasks_per_node or gpus or 1
    if args.what == "train":
        from autosam2.tracking import choose_store, ensure_experiment, read_run

        if cfg.tracking.enabled:
            # created once here, so ranks (and array tasks) never race to create it
            out.mkdir(parents=True, exist_ok=True)
            store = choose_store(cfg.tracking.uri, cfg.tracking.experiment, out, read_run(out))
            experiment_id = ensure_experiment(store.uri, store.experiment)
            print(f"MLflow experiment {store.experiment!r} ({experiment_id}) at {store.uri}")
            # the job logs where this says, whatever environment the site's sbatch passes on
            rest = [*rest, f"tracking.uri={store.uri}", f"tracking.experiment={store.experiment}"]
        jobs.append(_executor(args, folder, tasks, gpus).submit(TrainJob(rest)))
        _report(jobs[-1], "train", tasks * args.nodes)
    elif args.what == "evaluate":
        # ranks split the sequences; rank 0 gathers the metrics and writes the output folder
        jobs.append(_executor(args, folder, tasks, gpus).submit(EvaluateJob(rest)))
        _report(jobs[-1], "evaluate", tasks * args.nodes)
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
        submit(argv)
        return 0

    return run_command("launch", submitted)


if __name__ == "__main__":
    sys.exit(main())
