"""The start-up timeline: phases from the marks of every rank and the job's SLURM times."""

from __future__ import annotations

import json
import time

from autosam2.engine import startup


def epoch(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


SHOWN = (
    "JobId=7 JobName=autosam2-train UserId=root(0) JobState=RUNNING Reason=None SubmitTime=2026-12-06T10:00:00 "
    "EligibleTime=2026-12-06T10:00:00 StartTime=2026-12-06T10:00:02 EndTime=2026-12-06T14:00:02"
)


def test_the_jobs_submit_and_start_times_are_read_from_scontrol():
    assert startup.job_times(SHOWN) == {
        "submitted": epoch("2026-12-06T10:00:00"),
        "job_start": epoch("2026-12-06T10:00:02"),
    }
    assert startup.job_times("JobId=7 JobState=PENDING StartTime=Unknown") == {}


def test_each_phase_is_the_slowest_ranks_and_rank_0s_own_time_is_beside_it():
    t0 = epoch("2026-12-06T10:00:00")
    job = {"submitted": t0, "job_start": t0 + 2}
    ranks = [
        # rank 0: its torchrun started at +3 s, the rank at +4 s; and so on
        {"launcher": t0 + 3, "process": t0 + 4, "inputs_checked": t0 + 7, "group_joined": t0 + 12,
         "parts_built": t0 + 14, "loop_start": t0 + 15, "first_batch": t0 + 15.5, "first_step": t0 + 17},
        # rank 1, on a host whose srun step started later: its spawn and imports are slower, it waits less
        {"launcher": t0 + 5, "process": t0 + 7, "inputs_checked": t0 + 11.5, "group_joined": t0 + 12,
         "parts_built": t0 + 14.5, "loop_start": t0 + 15, "first_batch": t0 + 15.2, "first_step": t0 + 17.5},
    ]  # fmt: skip
    lines, metrics = startup.report(ranks, job)
    assert metrics == {
        "startup/queue_s": 2.0,
        "startup/launch_s": 3.0,
        "startup/spawn_s": 2.0,
        "startup/imports_s": 4.5,
        "startup/rendezvous_s": 5.0,
        "startup/build_s": 2.5,
        "startup/resume_s": 1.0,
        "startup/first_batch_s": 0.5,
        "startup/first_step_s": 2.3,
        "startup/total_s": 17.5,
    }
    assert [line.split()[1] for line in lines] == [*(p for p, _, _ in startup.PHASES), "total"]
    assert lines[1] == (
        "startup: launch         3.0 s  slowest rank 1 (rank 0 1.0 s): the job starts -> srun's step starts "
        "the launcher (torchrun) on each host"
    )
    assert lines[-1] == "startup: total         17.5 s  from sbatch to every rank's first step"


def test_outside_slurm_and_torchrun_the_timeline_starts_at_the_process():
    t0 = 1000.0
    lines, metrics = startup.report([{"process": t0, "inputs_checked": t0 + 3, "first_step": t0 + 9}], {})
    assert metrics == {"startup/imports_s": 3.0, "startup/first_step_s": 6.0, "startup/total_s": 9.0}
    assert (
        lines[-1] == "startup: total          9.0 s  from the first rank's start to every rank's first step"
    )


def test_the_record_replaces_only_a_record_of_ours_and_leaves_a_folder_a_link_or_a_users_file(
    tmp_path, capsys
):
    marks = [{"process": 1000.0, "first_step": 1009.0}]
    record = tmp_path / startup.RECORD
    assert startup.write_record(record, marks, {})
    assert startup.write_record(record, marks, {})  # its own record, replaced
    assert json.loads(record.read_text())["ranks"][0]["phases"] == {"first_step": 9.0}
    record.unlink()
    users = tmp_path / "notes.txt"
    users.write_text("mine\n")
    record.symlink_to(users)
    assert not startup.write_record(record, marks, {})
    assert record.is_symlink() and users.read_text() == "mine\n"
    record.unlink()
    record.mkdir()
    (record / "kept").write_text("x")
    assert not startup.write_record(record, marks, {})
    assert (record / "kept").read_text() == "x"
    (record / "kept").unlink()
    record.rmdir()
    record.write_text("mine\n")
    assert not startup.write_record(record, marks, {})
    assert record.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", startup.RECORD]  # no temp file left
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": left as it is")[0] for line in lines] == [
        f"startup: {record} is a link",
        f"startup: {record} is not a file",
        f"startup: {record} is not a start-up record",
    ]
