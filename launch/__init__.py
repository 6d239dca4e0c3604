"""submitit launchers for SLURM and local runs (issue 5/6)."""
