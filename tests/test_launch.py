"""The launcher without SLURM: submitit's local executor, and arguments read by each command's own parser."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from launch.__main__ import _output_dir_of, submit
from tests.helpers import train_overrides


def test_the_output_directory_is_read_by_the_commands_own_parser(tmp_path):
    assert (
        _output_dir_of("evaluate", ["--weights", "w.pt", f"--output-dir={tmp_path / 'a'}"]) == tmp_path / "a"
    )
    assert (
        _output_dir_of("evaluate", ["--weights", "w.pt", "--output-dir", str(tmp_path / "b")])
        == tmp_path / "b"
    )
    assert _output_dir_of("evaluate", ["--weights", "w.pt"]) == Path("results")
    shard = ["/data/pg", "--split", "train", f"--out={tmp_path / 'shards' / 'train'}"]
    assert _output_dir_of("shard", shard) == tmp_path / "shards"


@pytest.mark.slow
def test_a_local_two_task_job_is_one_run_of_world_size_two(train_data, tmp_path):
    # the tasks are processes of this host; each maps submitit's variables to torch's, as under srun
    out = tmp_path / "run"
    launch = ["train", "--cluster", "local", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"]
    (job,) = submit([*launch, "--", *train_overrides(train_data, out, **{"train.max_steps": 2})])
    results = job.results()
    assert len(results) == 2 and all(r["step"] == 2 and not r["stopped"] for r in results)
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")] == [1, 2]
