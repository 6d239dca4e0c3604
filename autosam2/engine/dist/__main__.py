"""`python -m autosam2.engine.dist port JOB_ID | max-requeues`: print a job's rendezvous port
(`slurm.job_port`) or the requeue cap (`slurm.MAX_REQUEUES`), for launch/train.sbatch."""

from __future__ import annotations

import argparse
import sys

from autosam2.arguments import non_negative_int
from autosam2.commands import DIST
from autosam2.engine.dist.slurm import MAX_REQUEUES, job_port


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
    args = parser.parse_args(argv)
    print(job_port(args.job_id) if args.command == "port" else MAX_REQUEUES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
