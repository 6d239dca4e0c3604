"""`python -m autosam2.engine.dist port JOB_ID`: print the job's rendezvous port (`slurm.job_port`)."""

import sys

from autosam2.engine.dist.slurm import job_port


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "port":
        print("usage: python -m autosam2.engine.dist port JOB_ID", file=sys.stderr)
        return 2
    print(job_port(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
