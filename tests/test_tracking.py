"""Tests for autosam2.tracking: SQLite and a real local `mlflow server`, read back with MlflowClient."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from autosam2.tracking import (
    HTTP_ENV_DEFAULTS,
    MAX_PARAM_VALUE_CHARS,
    MetricLogger,
    MLflowLogger,
    NullLogger,
    TrackingWarning,
    default_tracking_uri,
    ensure_experiment,
    flatten_config,
    make_logger,
)
from tests.helpers import free_port, kill_group


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Unset MLflow's env knobs (the logger sets some process-wide) and restore them afterwards."""
    names = [*HTTP_ENV_DEFAULTS, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MLFLOW_TRACKING_URI"]
    saved = {name: os.environ.pop(name, None) for name in names}
    # A stray ./mlruns must not appear in the cwd: artifacts belong next to the store.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not (cwd / "mlruns").exists()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return default_tracking_uri(tmp_path / "out")


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def _log_everything(logger: MLflowLogger, tmp_path: Path) -> dict[str, str]:
    """Log a representative run; return the flat params expected back."""
    params = {
        "model": {"variant": "hiera_t", "image_size": 256, "prompt": {"tokens": 8}},
        "optim": {"lr": 1e-4, "betas": [0.9, 0.999]},
        "long": "x" * (MAX_PARAM_VALUE_CHARS + 500),
        # More than one batch of 100 params.
        "many": {f"k{i:03d}": i for i in range(150)},
    }
    logger.log_params(params)
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    logger.set_tags({"engine": "ddp", "world_size": "2"})

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\0" * 64)
    results = tmp_path / "results"
    (results / "seq1").mkdir(parents=True)
    (results / "metrics.json").write_text("{}")
    (results / "seq1" / "mask.png").write_bytes(b"png")
    logger.log_artifact(weights)
    logger.log_artifact(results, artifact_path="eval")
    (tmp_path / "config.yaml").write_text("model:\n  variant: hiera_t\n")
    logger.log_artifact(tmp_path / "config.yaml")
    expected = flatten_config(params)
    expected["long"] = expected["long"][: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return expected


def _check_everything(client: mlflow.MlflowClient, run_id: str, expected: dict[str, str]) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == expected
    assert run.data.params["model.prompt.tokens"] == "8"
    assert run.data.params["optim.betas"] == "[0.9, 0.999]"
    assert _history(client, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert run.data.tags["engine"] == "ddp" and run.data.tags["world_size"] == "2"
    assert _artifact_paths(client, run_id) == {
        "weights.pt",
        "eval/results/metrics.json",
        "eval/results/seq1/mask.png",
        "config.yaml",
    }
    text = Path(client.download_artifacts(run_id, "config.yaml", dst_path=str(Path.cwd()))).read_text()
    assert text == "model:\n  variant: hiera_t\n"


def test_sqlite_run_reads_back(sqlite_uri: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        logger = MLflowLogger(sqlite_uri, "polyp", run_name="demo", system_metrics=False)
        assert isinstance(logger, MetricLogger) and logger.enabled
        expected = _log_everything(logger, tmp_path)
        logger.close()
    assert logger.failures == 0 and not logger.enabled

    client = mlflow.MlflowClient(sqlite_uri)
    _check_everything(client, logger.run_id, expected)
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "demo"
    assert client.get_experiment(run.info.experiment_id).name == "polyp"
    # Artifacts sit beside the database in the output dir, not in the caller's cwd.
    assert run.info.artifact_uri.startswith((tmp_path / "out" / "mlartifacts").as_uri())
    assert (tmp_path / "out" / "mlflow.db").is_file()


def test_resume_appends_to_the_same_run(sqlite_uri: str) -> None:
    params = {"train": {"epochs": 10, "lr": 0.1}}
    first = MLflowLogger(sqlite_uri, "polyp", system_metrics=False)
    first.log_params(params)
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close("KILLED")  # e.g. preempted; the checkpoint keeps first.run_id

    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        second = MLflowLogger(sqlite_uri, "polyp", run_id=first.run_id, system_metrics=False)
        assert second.run_id == first.run_id
        assert mlflow.MlflowClient(sqlite_uri).get_run(first.run_id).info.status == "RUNNING"
        # Same params again are fine; a changed one (MLflow refuses to change params) goes to a tag.
        second.log_params({"train": {"epochs": 20, "lr": 0.1}})
        for step in range(3, 6):
            second.log_metrics({"loss": float(step)}, step=step)
        second.close()
    assert second.failures == 0

    client = mlflow.MlflowClient(sqlite_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, first.run_id, "loss") == [(s, float(s)) for s in range(6)]
    assert run.data.params == {"train.epochs": "10", "train.lr": "0.1"}
    assert run.data.tags["param_changed.train.epochs"] == "20"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_unknown_run_starts_a_new_one(sqlite_uri: str) -> None:
    missing = "0" * 32
    with pytest.warns(TrackingWarning, match="not found"):
        logger = MLflowLogger(sqlite_uri, "polyp", run_id=missing, system_metrics=False)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.close()
    run = mlflow.MlflowClient(sqlite_uri).get_run(logger.run_id)
    assert logger.run_id != missing
    assert run.data.tags["resumed_from"] == missing and run.data.metrics == {"loss": 1.0}


def test_server_run_reads_back_then_server_dies(mlflow_server, tmp_path: Path) -> None:
    uri, proc, store = mlflow_server
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        logger = MLflowLogger(uri, "polyp", run_name="remote", system_metrics=False)
        expected = _log_everything(logger, tmp_path)
        logger.close()

    client = mlflow.MlflowClient(uri)
    _check_everything(client, logger.run_id, expected)
    # The server stored the artifacts (proxied), not this process.
    assert any(p.name == "weights.pt" for p in (store / "artifacts").rglob("*"))

    # Now the server dies in the middle of a second run: training goes on, warned once, quickly.
    logger = MLflowLogger(uri, "polyp", system_metrics_interval_s=1)  # its sampling thread too
    logger.log_metrics({"loss": 1.0}, step=0)
    kill_group(proc)
    start = time.monotonic()
    with pytest.warns(TrackingWarning) as caught:
        for step in range(1, 50):
            logger.log_metrics({"loss": 1.0}, step=step)
        logger.log_params({"a": 1})
        logger.close("FAILED")
    elapsed = time.monotonic() - start
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert uri in str(caught[0].message)
    assert logger.failures >= 50
    assert elapsed < 20, elapsed


def test_unreachable_server_never_stops_training(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.warns(TrackingWarning) as caught:
        logger = MLflowLogger(uri, "polyp", run_name="offline", system_metrics_interval_s=1)
        logger.log_params({"model": {"variant": "hiera_t"}})
        for step in range(20):
            logger.log_metrics({"loss": 0.5}, step=step)
        logger.set_tags({"a": "b"})
        logger.close()
    elapsed = time.monotonic() - start
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert uri in str(caught[0].message)
    assert logger.run_id is None and not logger.enabled
    assert elapsed < 20, elapsed
    # The logger bounded MLflow's HTTP retries for the process (MLflow's default is 7, ~4 minutes).
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )


def test_bad_uri_degrades_to_disabled() -> None:
    with pytest.warns(TrackingWarning, match="bogus://nowhere"):
        logger = MLflowLogger("bogus://nowhere", "polyp")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.close()
    assert not logger.enabled and logger.failures == 1


def test_failure_cools_down_then_recovers(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = MLflowLogger(sqlite_uri, "polyp", system_metrics=False, cooldown_s=0.3)
    client = logger._client
    real_log_batch = client.log_batch
    calls = []

    def down(*args, **kwargs):
        calls.append(kwargs)
        raise MlflowException("API request to http://x failed with exception ConnectionRefused")

    monkeypatch.setattr(client, "log_batch", down)
    with pytest.warns(TrackingWarning, match="failed to log metrics") as caught:
        for step in range(5):
            logger.log_metrics({"loss": 1.0}, step=step)
    assert len(caught) == 1
    assert len(calls) == 1  # the other four were dropped during the cool-down
    assert logger.failures == 5

    monkeypatch.setattr(client, "log_batch", real_log_batch)
    time.sleep(0.5)  # past the first cool-down (0.3 s); the next would last 0.6 s
    logger.log_metrics({"loss": 2.0}, step=10)
    logger.close()
    assert _history(mlflow.MlflowClient(sqlite_uri), logger.run_id, "loss") == [(10, 2.0)]


def test_refused_request_does_not_cool_down(sqlite_uri: str) -> None:
    logger = MLflowLogger(sqlite_uri, "polyp", system_metrics=False)
    with pytest.warns(TrackingWarning):
        logger.log_metrics({"bad[name]": 1.0}, step=0)  # MLflow refuses the name
    logger.log_metrics({"loss": 1.0}, step=1)  # the store is up: no calls dropped
    logger.close()
    assert logger.failures == 1
    assert _history(mlflow.MlflowClient(sqlite_uri), logger.run_id, "loss") == [(1, 1.0)]


def test_bad_arguments_raise(sqlite_uri: str, tmp_path: Path) -> None:
    logger = MLflowLogger(sqlite_uri, "polyp", system_metrics=False)
    with pytest.raises(ValueError):
        logger.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(FileNotFoundError):
        logger.log_artifact(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="status"):
        logger.close("DONE")
    logger.close()
    assert logger.failures == 0


def test_system_metrics_are_sampled(sqlite_uri: str) -> None:
    logger = MLflowLogger(sqlite_uri, "polyp", system_metrics=True, system_metrics_interval_s=1)
    logger.log_metrics({"loss": 1.0}, step=0)
    time.sleep(3.5)
    logger.close()
    client = mlflow.MlflowClient(sqlite_uri)
    keys = client.get_run(logger.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in keys, sorted(keys)
    assert "system/system_memory_usage_megabytes" in keys, sorted(keys)
    assert len(client.get_metric_history(logger.run_id, "system/cpu_utilization_percentage")) >= 2


def test_null_logger_and_make_logger(sqlite_uri: str, tmp_path: Path) -> None:
    null = make_logger(rank=1, enabled=True, tracking_uri=sqlite_uri, experiment="polyp", run_name="r")
    assert isinstance(null, NullLogger) and isinstance(null, MetricLogger) and null.run_id is None
    null.log_params({"a": {"b": 1}})
    null.log_metrics({"loss": 1.0}, step=0)
    null.set_tags({"a": "b"})
    null.log_artifact(tmp_path / "anything")
    null.close()
    assert isinstance(make_logger(0, False, sqlite_uri, "polyp", "r"), NullLogger)
    assert not (tmp_path / "out").exists()  # neither touched the store

    real = make_logger(0, True, sqlite_uri, "polyp", "r", system_metrics=False)
    assert isinstance(real, MLflowLogger) and real.run_id is not None
    real.close()


def test_ensure_experiment_is_idempotent_and_restores(sqlite_uri: str) -> None:
    first = ensure_experiment(sqlite_uri, "polyp")
    assert ensure_experiment(sqlite_uri, "polyp") == first
    assert ensure_experiment(sqlite_uri, "other") != first
    client = mlflow.MlflowClient(sqlite_uri)
    client.delete_experiment(first)
    assert ensure_experiment(sqlite_uri, "polyp") == first
    assert client.get_experiment(first).lifecycle_stage == "active"


def test_ensure_experiment_tolerates_a_creation_race(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = ensure_experiment(sqlite_uri, "polyp")  # another task created it first...
    real = mlflow.MlflowClient.get_experiment_by_name
    seen = []

    def stale_then_real(self, name):
        seen.append(name)
        return None if len(seen) == 1 else real(self, name)  # ...after our lookup found nothing

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", stale_then_real)
    assert ensure_experiment(sqlite_uri, "polyp") == winner
    assert len(seen) == 2


def test_flatten_config() -> None:
    @dataclass
    class Inner:
        size: int = 256
        tags: list[str] = field(default_factory=lambda: ["a", "b"])

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        lr: float = 1e-4
        checkpoint: str | None = None

    assert flatten_config({"a": {"b": {"c": 1}}, "d": True, "e": {}}) == {
        "a.b.c": "1",
        "d": "True",
        "e": "{}",
    }
    assert flatten_config(Outer()) == {
        "inner.size": "256",
        "inner.tags": "['a', 'b']",
        "lr": "0.0001",
        "checkpoint": "None",
    }
    assert flatten_config({"x": 1}, prefix="cfg.") == {"cfg.x": "1"}


def test_default_tracking_uri(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "run")
    assert uri == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")  # four slashes: an absolute path for SQLAlchemy


def test_credentials_in_a_tracking_uri_are_redacted_and_moved_to_mlflows_variables():
    from autosam2.tracking import redact_uri, take_uri_credentials

    uri = "http://alice:p%40ss@login01:5000/prefix"
    assert redact_uri(uri) == "http://***@login01:5000/prefix"
    assert redact_uri("http://login01:5000") == "http://login01:5000" and redact_uri(None) is None
    env: dict[str, str] = {}
    assert take_uri_credentials(uri, env) == "http://login01:5000/prefix"
    assert env == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss"}
    untouched: dict[str, str] = {}
    assert take_uri_credentials("sqlite:////runs/mlflow.db", untouched) == "sqlite:////runs/mlflow.db"
    assert untouched == {}


def test_a_tracking_failure_never_names_the_password():
    from autosam2.tracking import MLflowLogger

    with pytest.warns(TrackingWarning) as caught:
        MLflowLogger("http://bob:hunter2@127.0.0.1:9/", "e", system_metrics=False)  # port 9: refused
    assert caught and all("hunter2" not in str(w.message) for w in caught)
    assert any("***@127.0.0.1:9" in str(w.message) for w in caught)
