"""`python -m autosam2.engine.dist port JOB_ID`: print the job's rendezvous port (`slurm.job_port`)."""

from __future__ import annotations

import argparse
import sys

from autosam2.arguments import non_negative_int
from autosam2.commands import DIST
from autosam2.engine.dist.slurm import job_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=DIST, description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    port = sub.add_parser("port", help="the rendezvous port of SLURM job JOB_ID (launch/train.sbatch asks it)", allow_abbrev=False)
    port.add_argument("job_id", type=non_negative_int, metavar="JOB_ID")
    args = parser.parse_args(argv)
    print(job_port(args.job_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
