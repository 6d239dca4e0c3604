"""The launcher without SLURM: submitit's local executor, and arguments read by each command's own parser."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from launch.__main__ import _output_dir_of, submit
from tests.helpers import train_overrides


def test_the_output_directory_is_read_by_the_commands_own_parser(tmp_path, tiny_root_pristine):
    assert (
        _output_dir_of("evaluate", ["--weights", "w.pt", f"--output-dir={tmp_path / 'a'}"]) == tmp_path / "a"
    )
    assert (
        _output_dir_of("evaluate", ["--weights", "w.pt", "--output-dir", str(tmp_path / "b")])
        == tmp_path / "b"
    )
    assert _output_dir_of("evaluate", ["--weights", "w.pt"]) == Path("results")
    shard = [str(tiny_root_pristine), "--split", "train", f"--out={tmp_path / 'shards' / 'train'}"]
    assert _output_dir_of("shard", shard) == tmp_path / "shards" / "train"  # its jobs: train.jobs beside it


@pytest.mark.slow
def test_a_local_two_task_job_is_one_run_on_a_basic_auth_server_that_never_sees_the_password_leak(
    train_data, tmp_path, monkeypatch, capfd
):
    """The tasks are processes of this host; each maps submitit's variables to torch's, as under srun.
    The run logs to a tracking server with MLflow's basic auth, the password given in the URI: it
    reaches the job through the environment only, not its pickled arguments, params, config or logs;
    and the server refuses a client without it."""
    import os

    from mlflow.exceptions import MlflowException

    from tests.helpers import kill_group, start_mlflow_server

    password = "s3cret-" + os.urandom(6).hex()
    uri, server = start_mlflow_server(tmp_path / "server", admin_password=password)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # the launcher sets them; monkeypatch puts them back
    try:
        with pytest.raises(MlflowException, match="401|nauthori"):
            mlflow.MlflowClient(uri).search_experiments()
        out = tmp_path / "run"
        launch = [
            "train",
            "--cluster",
            "local",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
        ]
        launch += ["--tracking-uri", uri.replace("http://", f"http://admin:{password}@")]
        (job,) = submit([*launch, "--", *train_overrides(train_data, out, **{"train.max_steps": 2})])
        results = job.results()
        assert len(results) == 2 and all(r["step"] == 2 and not r["stopped"] for r in results)
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == password  # how the job got it
        client = mlflow.MlflowClient(uri)  # authenticated by those variables
        (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
        assert run.data.params["tracking.uri"] == uri
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total")] == [1, 2]
        leaks = [p for p in out.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        assert not leaks, f"the password is written in {leaks}"  # job pickles, logs, config.yaml
        assert password not in str(run.data.params) + str(run.data.tags) + "".join(capfd.readouterr())
    finally:
        kill_group(server)
