"""Tests for the autosam2.tracking package and `autosam2 sync`: SQLite and a real local `mlflow server`, read back with MlflowClient."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from autosam2.tracking import (
    MetricLogger,
    MLflowLogger,
    NullLogger,
    TrackingWarning,
    default_tracking_uri,
    ensure_experiment,
    flatten_config,
    make_logger,
)
from autosam2.tracking.mlflow_store import HTTP_ENV_DEFAULTS, MAX_PARAM_VALUE_CHARS
from tests.helpers import free_port, kill_group, start_mlflow_server


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
    return default_tracking_uri(tmp_path / "out" / "run")  # out/mlflow.db


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
    # Artifacts sit beside the database, not in the caller's cwd.
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


def test_a_value_changed_back_on_a_later_resume_is_the_one_its_tag_holds(sqlite_uri: str) -> None:
    run_id = None
    for lr in (0.1, 0.01, 0.1):  # the first run, then two resumed ones
        logger = MLflowLogger(sqlite_uri, "polyp", run_id=run_id, system_metrics=False)
        logger.log_params({"optim": {"lr": lr}})
        logger.close("KILLED")
        run_id = logger.run_id
        run = mlflow.MlflowClient(sqlite_uri).get_run(run_id)
        assert run.data.params == {"optim.lr": "0.1"}  # MLflow keeps a param's first value
        assert run.data.tags.get("param_changed.optim.lr", "0.1") == str(lr)  # the value in effect


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


def _metric_steps(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_an_outage_in_the_middle_and_at_the_end_loses_nothing_and_sends_nothing_twice(
    mlflow_server, tmp_path: Path
) -> None:
    """The server dies mid-run, comes back on its port, dies again before the end: logging calls never
    wait for it, the sender delivers what it can when it can, the rest waits in the outbox, and `sync`
    sends it once the server is back: every step and artifact once."""
    uri, proc, store = mlflow_server
    port = int(uri.rsplit(":", 1)[1])
    spool = tmp_path / "run" / "tracking"
    logger = MLflowLogger(uri, "polyp", spool_dir=spool, system_metrics=False, max_backoff_s=1.0)
    artifact = tmp_path / "sheet.png"

    def log_steps(steps: range) -> float:
        longest = 0.0
        for step in steps:
            start = time.monotonic()
            logger.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
            if step % 10 == 0:
                artifact.write_bytes(f"step {step}".encode())
                logger.log_artifact(artifact, f"valid/step_{step}")
            longest = max(longest, time.monotonic() - start)
        return longest

    log_steps(range(1, 21))
    kill_group(proc)
    with pytest.warns(TrackingWarning, match="records wait in .* and are retried") as seen:
        stall = log_steps(range(21, 51))
        deadline = time.monotonic() + 60  # the sender meets the dead server (~3 s a try on an idle machine)
        while not any(issubclass(w.category, TrackingWarning) for w in seen) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert stall < 0.5, stall  # a generous bound on local appends; `bench tracking` measures it
    _, proc = start_mlflow_server(store, port=port)
    try:
        log_steps(range(51, 71))
        deadline = time.monotonic() + 60
        while logger.outbox.unsent() and time.monotonic() < deadline:  # the sender catches up
            time.sleep(0.2)
        assert logger.outbox.unsent() == 0
        kill_group(proc)
        log_steps(range(71, 101))
        logger.close(flush_timeout_s=2.0)
    finally:
        kill_group(proc)
    left = logger.outbox.unsent()
    assert left > 30  # steps 71-100, their artifacts and the end of the run wait in the outbox
    _, proc = start_mlflow_server(store, port=port)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "autosam2.cli", "sync", str(spool.parent), "--tracking-uri", uri],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert f"sync: {left} record(s) sent" in done.stdout
        client = mlflow.MlflowClient(uri)
        assert _metric_steps(client, logger.run_id, "train/loss") == list(range(1, 101))
        assert _metric_steps(client, logger.run_id, "train/lr") == list(range(1, 101))
        assert _artifact_paths(client, logger.run_id) == {
            f"valid/step_{s}/sheet.png" for s in range(10, 101, 10)
        }
        sent = client.download_artifacts(
            logger.run_id, "valid/step_40/sheet.png", dst_path=str(tmp_path / "dl")
        )
        assert (
            Path(sent).read_bytes() == b"step 40"
        )  # as it was when logged, not as it is now (rewritten in place)
        assert client.get_run(logger.run_id).info.status == "FINISHED"
        assert not any((spool / "artifacts").rglob("*.png"))  # each spooled file goes once it is sent
        again = subprocess.run(
            [sys.executable, "-m", "autosam2.cli", "sync", str(spool.parent), "--tracking-uri", uri],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0 and "sync: 0 record(s) sent" in again.stdout
        assert _metric_steps(client, logger.run_id, "train/loss") == list(range(1, 101))
    finally:
        kill_group(proc)


@pytest.mark.slow
def test_a_training_run_through_two_outages_reaches_mlflow_whole_after_sync(
    mlflow_server, train_data, tmp_path: Path
) -> None:
    """`autosam2 train` with its tracking server killed mid-run, restarted, killed again before the end:
    the run finishes on time, says what it kept and how to send it, and after `autosam2 sync` the run
    holds every step's loss, every validation's metrics and pictures, and the weights, each once."""
    from tests.helpers import train_overrides, wait_for_line

    uri, proc, store = mlflow_server
    port = int(uri.rsplit(":", 1)[1])
    out = tmp_path / "run"
    overrides = train_overrides(
        train_data,
        out,
        **{
            "train.max_steps": 16,
            "train.validate_every": 4,
            "train.checkpoint_every": 4,
            "tracking.uri": uri,
            "tracking.flush_timeout_s": 3,
        },
    )
    log = tmp_path / "train.log"
    with open(log, "wb") as sink:
        job = subprocess.Popen(
            [sys.executable, "-m", "autosam2.cli", "train", *overrides], stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for_line(log, "step 3/16")
        kill_group(proc)
        wait_for_line(log, "step 8/16")
        _, proc = start_mlflow_server(store, port=port)
        wait_for_line(log, "step 11/16")
        kill_group(proc)
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        job.kill()
    text = log.read_text()
    assert f"send them with `autosam2 sync {out}`" in text, text[-3000:]
    _, proc = start_mlflow_server(store, port=port)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "autosam2.cli", "sync", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("autosam2").experiment_id])
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert _metric_steps(client, run_id, "train/loss_total") == list(range(1, 17))
        assert _metric_steps(client, run_id, "valid/dice") == [4, 8, 12, 16]
        paths = _artifact_paths(client, run_id)
        for step in (4, 8, 12, 16):
            assert f"valid/step_{step:08d}/metrics.csv" in paths, sorted(paths)
            assert any(p.startswith(f"valid/step_{step:08d}/overlays/") for p in paths), sorted(paths)
        assert "weights/final.pt" in paths and "config.yaml" in paths
    finally:
        kill_group(proc)


def test_a_server_down_from_the_start_gets_the_whole_run_once_it_is_up(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens there yet
    spool = tmp_path / "run" / "tracking"
    started_ms = int(time.time() * 1000)
    with pytest.warns(TrackingWarning, match="failed to start the run") as caught:
        logger = MLflowLogger(uri, "polyp", run_name="offline", spool_dir=spool, system_metrics_interval_s=1)
        logger.log_params({"model": {"variant": "hiera_t"}})
        for step in range(20):
            logger.log_metrics({"loss": 0.5}, step=step)
        logger.set_tags({"a": "b"})
        time.sleep(2.5)  # system metrics are sampled meanwhile (every second), into the outbox too
        logger.close(flush_timeout_s=1.0)
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert logger.run_id is None and not logger.enabled
    # The logger bounded MLflow's HTTP retries for the process (MLflow's default is 7, ~4 minutes).
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )
    from autosam2.sync import sync

    uri, proc = start_mlflow_server(tmp_path / "server", port=port)
    try:
        sent, left = sync(spool.parent, uri)
        assert left == 0 and sent > 20
        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("polyp").experiment_id])
        assert run.info.run_name == "offline" and run.info.status == "FINISHED"
        assert run.info.start_time < started_ms + 10_000 and run.info.end_time < started_ms + 60_000
        assert run.data.params == {"model.variant": "hiera_t"} and run.data.tags["a"] == "b"
        assert _metric_steps(client, run.info.run_id, "loss") == list(range(20))
        assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 1
    finally:
        kill_group(proc)


def test_scores_a_store_did_not_take_are_kept_for_sync_and_nothing_is_left_when_it_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate, score and benchmark log through `log_scores`: with the server down their records stay in
    OUT/tracking beside the store's record, and `autosam2 sync OUT` sends them; with it up, OUT holds no
    tracking folder."""
    import autosam2.tracking as tracking
    from autosam2.eval.report import log_scores
    from autosam2.sync import sync
    from autosam2.tracking.choice import Store

    real = tracking.make_logger
    monkeypatch.setattr(tracking, "make_logger", lambda *a, **k: real(*a, **{**k, "flush_timeout_s": 1.0}))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens there yet
    outs = [tmp_path / "down", tmp_path / "up"]
    for out in outs:
        out.mkdir()
        (out / "metrics.json").write_text('{"dice": 0.5}')
        (out / "metrics.csv").write_text("dice\n0.5\n")
    with pytest.warns(TrackingWarning, match="-- scoring goes on; records wait in"):
        log_scores(outs[0], Store(uri, "polyp", "explicit"), "score-down", {"pred": "p"}, {"dice": 0.5})
    assert (outs[0] / "tracking" / "outbox.jsonl").is_file()
    uri, proc = start_mlflow_server(tmp_path / "server", port=port)
    try:
        sent, left = sync(outs[0])  # to the store recorded beside the outbox
        assert left == 0 and sent >= 3
        log_scores(outs[1], Store(uri, "polyp", "explicit"), "score-up", {"pred": "p"}, {"dice": 0.5})
        assert sorted(p.name for p in outs[1].iterdir()) == ["metrics.csv", "metrics.json"]
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("polyp").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["score-down", "score-up"]
        assert all(r.data.metrics["eval/dice"] == 0.5 for r in runs)
    finally:
        kill_group(proc)


def test_bad_uri_degrades_to_disabled() -> None:
    with pytest.warns(TrackingWarning, match="bogus://nowhere"):
        logger = MLflowLogger("bogus://nowhere", "polyp")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.close()
    assert not logger.enabled and logger.failures == 1


def test_a_failing_store_is_retried_with_backoff_and_gets_every_record_in_order(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = MLflowLogger(sqlite_uri, "polyp", system_metrics=False, max_backoff_s=0.2)
    client = logger._client
    real_log_batch = client.log_batch
    calls: list[float] = []

    def down_then_up(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) <= 4:
            raise MlflowException("API request to http://x failed with exception ConnectionRefused")
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(client, "log_batch", down_then_up)
    with pytest.warns(TrackingWarning, match="failed to log metrics") as caught:
        for step in range(5):
            logger.log_metrics({"loss": float(step)}, step=step)
        logger.close()
    assert len(caught) == 1 and logger.failures == 4
    gaps = [b - a for a, b in zip(calls, calls[1:5], strict=False)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # each retry waits (0.5 s doubling, capped at 0.2 s here)
    assert _history(mlflow.MlflowClient(sqlite_uri), logger.run_id, "loss") == [
        (s, float(s)) for s in range(5)
    ]


def test_a_refused_record_is_stepped_over_and_the_rest_arrive(sqlite_uri: str, tmp_path: Path) -> None:
    logger = MLflowLogger(sqlite_uri, "polyp", system_metrics=False, spool_dir=tmp_path / "tracking")
    with pytest.warns(TrackingWarning, match="bad\\[name\\]"):
        logger.log_metrics({"bad[name]": 1.0}, step=0)  # MLflow refuses the name
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.close()
    assert logger.failures == 1 and logger.outbox.unsent() == 0
    assert _history(mlflow.MlflowClient(sqlite_uri), logger.run_id, "loss") == [(1, 1.0)]


def test_the_outbox_survives_a_line_cut_by_a_kill(tmp_path: Path, sqlite_uri: str) -> None:
    """A process killed while appending leaves half a line: the next logger starts a fresh line, the
    sender steps over the broken one and delivers the rest (the killed job's records included)."""
    from autosam2.tracking.outbox import Outbox

    spool = tmp_path / "tracking"
    first = MLflowLogger(sqlite_uri, "polyp", system_metrics=False, spool_dir=spool)
    run_id = first.run_id
    first._sender.finish(0)  # the sender is gone, as in a killed process: nothing more is delivered
    first._sender.join(10)
    for step in range(3):
        first.outbox.append(
            {"op": "metrics", "run": run_id, "step": step, "t": 1000 + step, "metrics": {"loss": 1.0}}
        )
    with open(spool / "outbox.jsonl", "ab") as f:
        f.write(b'{"op":"metrics","run":"' + run_id.encode() + b'","st')  # the kill came here
    second = MLflowLogger(sqlite_uri, "polyp", run_id=run_id, system_metrics=False, spool_dir=spool)
    second.log_metrics({"loss": 2.0}, step=3)
    second.close()
    assert Outbox(spool).unsent() == 0
    assert _history(mlflow.MlflowClient(sqlite_uri), run_id, "loss") == [
        (0, 1.0),
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
    ]


def test_a_full_disk_cuts_one_record_and_the_outbox_goes_on(tmp_path: Path) -> None:
    """The disk takes half a line and then refuses: that append fails alone (the logger warns and goes
    on), nothing stays buffered to fail later appends or `close`, and the next record starts its own line."""
    import errno

    from autosam2.tracking.outbox import Outbox

    def record(step: int) -> dict:
        return {"op": "metrics", "step": step, "t": step, "metrics": {"loss": 1.0}}

    outbox = Outbox(tmp_path / "tracking")
    outbox.append(record(0))
    real = outbox._file

    class FullDisk:
        def write(self, data) -> int:
            if len(data) > 4:
                return real.write(data[: len(data) // 2])  # a short write, as the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            real.close()

    outbox._file = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        outbox.append(record(1))
    outbox._file = real  # space again
    outbox.append(record(2))
    outbox.close()
    kept = [found for _, found in Outbox(tmp_path / "tracking").pending()]
    assert kept == [record(0), None, record(2)]


def test_an_artifact_is_hard_linked_into_the_outbox_and_keeps_what_was_logged(tmp_path: Path) -> None:
    """No second copy of a weights file on the disk: our writers replace it by rename, so the linked inode
    keeps the logged content; any other file (an overlay) may be rewritten in place, so it is copied."""
    from autosam2.atomic import atomic_write_text
    from autosam2.tracking.outbox import Outbox

    outbox = Outbox(tmp_path / "tracking")
    weights = tmp_path / "final.pt"
    atomic_write_text(weights, "as logged")
    overlays = tmp_path / "overlays"
    (overlays / "seq1").mkdir(parents=True)
    (overlays / "a.gif").write_bytes(b"GIF89a-a")
    (overlays / "seq1" / "b.gif").write_bytes(b"GIF89a-b")
    file_place, folder_place = outbox.spool(weights), outbox.spool(overlays)
    linked = outbox.folder / file_place
    assert linked.stat().st_ino == weights.stat().st_ino and weights.stat().st_nlink == 2
    for name in ("a.gif", "seq1/b.gif"):
        original, spooled = overlays / name, outbox.folder / folder_place / name
        assert spooled.read_bytes() == original.read_bytes() and original.stat().st_nlink == 1
    atomic_write_text(weights, "written later")  # replaced by rename, as every weights file we log is
    assert linked.read_text() == "as logged" and weights.stat().st_nlink == 1
    (overlays / "a.gif").write_bytes(b"rewritten in place")
    assert (outbox.folder / folder_place / "a.gif").read_bytes() == b"GIF89a-a"
    outbox.unspool(folder_place)
    assert (overlays / "a.gif").read_bytes() == b"rewritten in place"


def test_an_artifact_that_cannot_be_linked_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from autosam2.tracking.outbox import Outbox

    def across_file_systems(source, target, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", across_file_systems)
    outbox = Outbox(tmp_path / "tracking")
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"weights")
    spooled = outbox.folder / outbox.spool(weights)
    assert spooled.read_bytes() == b"weights" and spooled.stat().st_ino != weights.stat().st_ino
    assert weights.stat().st_nlink == 1


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
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # beside the run: shared with its neighbours
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


def test_a_record_edited_into_another_shape_is_stepped_over_not_sent(tmp_path: Path) -> None:
    from autosam2.tracking.outbox import Outbox

    outbox = Outbox(tmp_path / "tracking")
    outbox.append({"op": "metrics", "step": "x", "values": 5})  # no metrics, a step that is no number
    outbox.append({"op": "metrics", "step": 1, "t": 0, "metrics": {"loss": 1.0}})
    with open(outbox.path, "ab") as f:
        f.write(b"[1, 2]\n")
    records = [record for _, record in outbox.pending()]
    assert records == [None, {"op": "metrics", "step": 1, "t": 0, "metrics": {"loss": 1.0}}, None]


def test_sync_takes_the_output_dir_as_a_positional_or_as_an_option(
    tmp_path: Path, sqlite_uri: str, capsys: pytest.CaptureFixture
) -> None:
    from autosam2.sync import main
    from autosam2.tracking.outbox import FOLDER, Outbox

    for argv in ([str(tmp_path)], ["--output-dir", str(tmp_path)]):
        with pytest.raises(FileNotFoundError, match="no tracking outbox here"):
            main(argv)
    for argv in ([], [str(tmp_path), "--output-dir", str(tmp_path)]):  # neither, or both
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    Outbox(tmp_path / FOLDER).close()
    capsys.readouterr()
    assert main(["--output-dir", str(tmp_path), "--tracking-uri", sqlite_uri, "--timeout", "10"]) == 0
    assert f"sync: 0 record(s) sent; the outbox of {tmp_path} is empty" in capsys.readouterr().out


@pytest.mark.parametrize(
    "record", ['{"uri": "sql', '{"uri": 5}', '{"uri": "sqlite:////nowhere/gone.db"}', None]
)
def test_sync_without_a_usable_store_record_names_the_record_in_one_line(tmp_path: Path, record) -> None:
    """A run whose tracking/store.json is corrupt, names no store or one no longer there: sync names that
    file (config.yaml for a run that has none) and asks for --tracking-uri."""
    from autosam2.sync import main
    from autosam2.tracking.outbox import FOLDER, Outbox

    Outbox(tmp_path / FOLDER).close()
    named = tmp_path / "config.yaml"
    if record is not None:
        named = tmp_path / FOLDER / "store.json"
        named.write_text(record)
    with pytest.raises(FileNotFoundError) as caught:
        main([str(tmp_path), "--timeout", "1"])
    assert caught.value.filename == str(named)
    assert caught.value.strerror == "records no tracking store that is there; pass --tracking-uri"
