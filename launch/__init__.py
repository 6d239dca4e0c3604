"""submitit launchers for SLURM and local runs."""
