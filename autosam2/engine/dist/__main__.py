"""`python -m autosam2.engine.dist port JOB_ID | max-requeues | after-srun STATUS ...`: print a job's
rendezvous port (`slurm.job_port`) or the requeue cap (`slurm.MAX_REQUEUES`), for the sbatch templates;
after srun, requeue a job whose rank died (`slurm.requeue_after_failure`), for the job scripts of
launch/train.sbatch and `python -m launch train --max-failures`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from autosam2.arguments import non_negative_int
from autosam2.commands import DIST
from autosam2.engine.dist.slurm import MAX_REQUEUES, job_port, requeue_after_failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=DIST, description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    port = sub.add_parser(
        "port",
        help="the rendezvous port of SLURM job JOB_ID (launch/train.sbatch asks it)",
        allow_abbrev=False,
    )
    port.add_argument("job_id", type=non_negative_int, metavar="JOB_ID")
    sub.add_parser(
        "max-requeues",
        help="the times a training job requeues itself at its time limit (python -m launch's default)",
        allow_abbrev=False,
    )
    after = sub.add_parser(
        "after-srun",
        help="once srun has ended with STATUS: requeue this SLURM job (SLURM_JOB_ID) if a rank died and "
        "it was requeued after a failure fewer than --max-failures times (the count in --count-file)",
        allow_abbrev=False,
    )
    after.add_argument("status", type=non_negative_int, metavar="STATUS")
    after.add_argument("--max-failures", type=non_negative_int, required=True)
    after.add_argument("--count-file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "after-srun":
        job = os.environ.get("SLURM_JOB_ID", "")
        if not job:
            parser.error("after-srun runs in a SLURM job (SLURM_JOB_ID is not set)")
        requeue_after_failure(args.status, args.max_failures, args.count_file, job)
        return 0
    print(job_port(args.job_id) if args.command == "port" else MAX_REQUEUES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
