"""The start-up timeline of a training process, from the job's submission to its first step.

Each rank notes when it passes the marks of its start (`mark`); the moments before the process existed
come from the system: the job's submit and start times from SLURM (`scontrol show job`, rank 0 only,
after the first step), the launcher's start (torchrun, this process's parent) and this process's own
start from the process table. After the first step every rank's marks are gathered and rank 0 prints one
line per phase, the slowest rank's time for it beside its own, logs them as ``startup/<phase>_s`` and
writes every rank's marks and phases to ``OUTPUT_DIR/startup.json`` (`RECORD`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# (phase, the mark that ends it, what it covers); a phase starts at the mark of the row before it
PHASES: tuple[tuple[str, str, str], ...] = (
    ("queue", "job_start", "sbatch -> the job starts on its nodes"),
    ("launch", "launcher", "the job starts -> srun's step starts the launcher (torchrun) on each host"),
    (
        "spawn",
        "process",
        "-> this rank's process starts (torchrun's rendezvous of hosts, or srun's task launch)",
    ),
    ("imports", "inputs_checked", "the rank starts -> Python, torch and the run's inputs are read"),
    ("rendezvous", "group_joined", "the process group is joined: every rank has reached it"),
    ("build", "parts_built", "the model, the engine and the data are built"),
    ("resume", "loop_start", "the checkpoint is read and the tracking run started"),
    ("first_batch", "first_batch", "the first batch arrives"),
    ("first_step", "first_step", "the first step is done"),
)
FIRST = "submitted"
RECORD = "startup.json"  # in the output directory: the last start's marks and phases, every rank
RECORD_BYTES = 64 << 20  # a file at RECORD larger than this is not a record of ours (it is not read)


@dataclass
class Timeline:
    """This process's marks: name -> seconds since the epoch (wall clock: comparable across hosts as
    far as their clocks agree, and with SLURM's and the process table's times)."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def with_system_times(self) -> dict[str, float]:
        """The marks and the process's and its launcher's start (from the process table)."""
        marks = dict(self.marks)
        marks.update(_process_starts())
        return marks


TIMELINE = Timeline()


def mark(name: str) -> None:
    TIMELINE.mark(name)


def _process_starts() -> dict[str, float]:
    """This process's start, and its launcher's when torchrun started it (its parent)."""
    try:
        import psutil

        me = psutil.Process()
        found = {"process": me.create_time()}
        if "TORCHELASTIC_RUN_ID" in os.environ and me.parent() is not None:
            found["launcher"] = me.parent().create_time()
        return found
    except Exception:  # noqa: BLE001 -- no process table to read: the phases before it are left out
        return {}


def slurm_times(job_id: str | None = None) -> dict[str, float]:
    """The job's submit and start times from `scontrol show job` (whole seconds, local time), or
    nothing outside SLURM or when scontrol does not answer."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return {}
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return job_times(shown)


def job_times(shown: str) -> dict[str, float]:
    """The submit and start times in `scontrol show job` output, as seconds since the epoch."""
    found = {}
    for key, name in (("SubmitTime", FIRST), ("StartTime", "job_start")):
        match = re.search(rf"\b{key}=(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d)\b", shown)
        if match:
            found[name] = time.mktime(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return found


def phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase where both of its ends are known (a phase whose start is missing begins at
    the latest known mark before it)."""
    out: dict[str, float] = {}
    last = marks.get(FIRST)
    for name, end, _ in PHASES:
        if end not in marks:
            continue
        if last is not None:
            out[name] = max(0.0, marks[end] - last)
        last = marks[end]
    return out


def report(all_marks: list[dict[str, float]], job: dict[str, float]) -> tuple[list[str], dict[str, float]]:
    """Rank 0's lines (one per phase: its time on rank 0 and on the slowest rank) and the metrics
    ``startup/<phase>_s`` (the slowest rank's) of every rank's marks and the job's SLURM times."""
    per_rank = [phases({**job, **marks}) for marks in all_marks]
    lines, metrics = [], {}
    for name, _, what in PHASES:
        times = [(p[name], rank) for rank, p in enumerate(per_rank) if name in p]
        if not times:
            continue
        slowest, rank = max(times)
        mine = per_rank[0].get(name)
        beside = f" (rank 0 {mine:.1f} s)" if rank != 0 and mine is not None and len(times) > 1 else ""
        lines.append(f"startup: {name:<11} {slowest:6.1f} s  slowest rank {rank}{beside}: {what}")
        metrics[f"startup/{name}_s"] = round(slowest, 3)
    first = job.get(FIRST, min((m[k] for m in all_marks for k in m), default=None))
    done = max((m["first_step"] for m in all_marks if "first_step" in m), default=None)
    if first is not None and done is not None:
        since = "sbatch" if FIRST in job else "the first rank's start"
        lines.append(f"startup: total       {done - first:6.1f} s  from {since} to every rank's first step")
        metrics["startup/total_s"] = round(done - first, 3)
    return lines, metrics


def write_record(path: Path, all_marks: list[dict[str, float]], job: dict[str, float]) -> bool:
    """Every rank's marks (seconds since the epoch) and phases, and the job's SLURM times, at `path`, where
    it is free or holds a record of ours; anything else there (a folder, a link, the user's file) is left
    as it is, with one line saying so, and the run goes on without the record. True: written."""
    from autosam2.atomic import atomic_write_text

    problem = _not_a_record(path)
    if problem:
        print(f"startup: {path} {problem}: left as it is, the start-up record is not written", flush=True)
        return False
    ranks = [{"marks": marks, "phases": phases({**job, **marks})} for marks in all_marks]
    atomic_write_text(path, json.dumps({"job": job, "ranks": ranks}, indent=1) + "\n")
    return True


def _not_a_record(path: Path) -> str | None:
    """Why what is at `path` is not a start-up record of ours to replace (None: nothing there, or one)."""
    if path.is_symlink():
        return "is a link"
    if not path.exists():
        return None
    if not path.is_file():
        return "is not a file"
    if path.stat().st_size > RECORD_BYTES:
        return "is not a start-up record (too large)"
    from autosam2.outputs import json_object

    return None if {"job", "ranks"} <= json_object(path).keys() else "is not a start-up record"
