"""Tests for autosam2.tracking.choice: which MLflow store and experiment a command logs to, what a run
directory records of its own, the links from evaluations to training runs, and the runs' names; and two
runs writing into one SQLite store at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from autosam2.tracking.choice import (
    PARENT_TAG,
    RunRecord,
    Store,
    choose_store,
    default_tracking_uri,
    link_tags,
    read_run,
    record_store,
    scoring_run_name,
    scoring_store,
    training_run_name,
)


def test_the_default_store_is_shared_by_the_output_dirs_beside_each_other(tmp_path: Path) -> None:
    a, b = default_tracking_uri(tmp_path / "runs" / "a"), default_tracking_uri(tmp_path / "runs" / "b")
    assert a == b == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    assert a.startswith("sqlite:////")  # an absolute path for SQLAlchemy
    relative = default_tracking_uri("output/hiera_t")
    assert relative == f"sqlite:///{Path('output').resolve()}/mlflow.db"


def test_explicit_beats_mlflows_variables_beats_the_runs_record_beats_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "runs" / "a"
    run = RunRecord(out, "r1", "http://recorded:5000", "recorded")
    assert choose_store(None, None, out) == Store(default_tracking_uri(out), "autosam2", "default")
    assert choose_store(None, None, out, run) == Store("http://recorded:5000", "recorded", "run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert choose_store(None, None, out, run) == Store("http://env:5000", "from-env", "environment")
    assert choose_store("http://flag:5000", "flag", out, run) == Store("http://flag:5000", "flag", "explicit")
    # each of the two is chosen on its own: a flag for one leaves the other to the variables
    assert choose_store("http://flag:5000", None, out, run).experiment == "from-env"
    assert choose_store(None, "flag", out, run).uri == "http://env:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty: not a choice
    assert choose_store(None, None, out).source == "default"


def test_credentials_in_mlflows_variable_move_out_of_the_chosen_uri(
    monkeypatch: pytest.MonkeyPatch, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:secret@login01:5000")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert choose_store(None, None, tmp_path).uri == "http://login01:5000"
    import os

    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "alice",
        "secret",
    )


def test_a_run_dir_is_read_from_its_record_or_from_what_older_runs_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert read_run(out) is None  # nothing there
    (out / "tracking").mkdir(parents=True)
    (out / "tracking" / "sent.json").write_text(json.dumps({"sent": 0, "run_id": "abc"}))
    assert read_run(out) == RunRecord(out.resolve(), "abc", None, None)
    # a run that kept its store in its own folder, with config.yaml's experiment
    (out / "mlflow.db").write_bytes(b"")
    (out / "config.yaml").write_text("tracking:\n  uri: null\n  experiment: polyp\n")
    assert read_run(out) == RunRecord(out.resolve(), "abc", f"sqlite:///{out.resolve()}/mlflow.db", "polyp")
    (out / "config.yaml").write_text("tracking:\n  uri: http://login01:5000\n  experiment: polyp\n")
    assert read_run(out).uri == "http://login01:5000"
    (out / "config.yaml").write_text(":\n  - [unclosed")  # not YAML: as if it said nothing
    assert read_run(out).experiment is None
    record_store(out, Store(f"sqlite:///{tmp_path}/moved/mlflow.db", "e", "default"))
    assert read_run(out).uri is None  # a store no longer there: the default finds the moved one
    record_store(out, Store("http://server:5000", "e", "environment"))
    assert read_run(out) == RunRecord(out.resolve(), "abc", "http://server:5000", "e")
    assert choose_store(None, None, out, read_run(out)).uri == "http://server:5000"


@pytest.mark.parametrize(
    "record", [{"uri": 5, "experiment": 7}, {"uri": ["x"], "experiment": {}}, {"uri": "", "experiment": ""}]
)
def test_a_record_whose_store_or_experiment_is_no_name_counts_as_naming_none(tmp_path: Path, record) -> None:
    """store.json edited by hand (a number, a list, an empty name): read as naming no store or experiment,
    so the choice falls to the flags, MLflow's variables or the default."""
    out = tmp_path / "run"
    (out / "tracking").mkdir(parents=True)
    (out / "tracking" / "store.json").write_text(json.dumps(record))
    (out / "tracking" / "sent.json").write_text(json.dumps({"sent": 0, "run_id": "abc"}))
    assert read_run(out) == RunRecord(out.resolve(), "abc", None, None)
    chosen = choose_store(None, None, out, read_run(out))
    assert chosen.uri == default_tracking_uri(out) and chosen.experiment == "autosam2"


def test_a_resumed_run_keeps_the_store_it_started_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autosam2.config import TrackingConfig
    from autosam2.tracking import start_run

    out = tmp_path / "runs" / "old"  # written before the shared store: its own OUT/mlflow.db
    first = start_run(
        TrackingConfig(uri=f"sqlite:///{out}/mlflow.db", system_metrics=False),
        out, 0, None, {"a": 1}, {}, _config(out), "old",
    )  # fmt: skip
    run_id = first.run_id
    first.close()
    (out / "tracking" / "store.json").unlink()  # as an older run left it: no record of its store
    (out / "config.yaml").write_text("tracking:\n  uri: null\n")
    again = start_run(TrackingConfig(system_metrics=False), out, 0, run_id, {"a": 1}, {}, _config(out))
    assert again.run_id == run_id  # found where it started, not in the shared default store
    again.close()
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert (
        json.loads((out / "tracking" / "store.json").read_text())["uri"]
        == f"sqlite:///{out.resolve()}/mlflow.db"
    )


def _config(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("tracking:\n  uri: null\n")
    return out / "config.yaml"


def test_weights_of_no_run_are_said_once_and_logged_unlinked(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "downloads" / "sam2.1_hiera_tiny.pt"
    store, link = scoring_store(None, None, tmp_path / "results", weights)
    assert store == Store(default_tracking_uri(tmp_path / "results"), "autosam2", "default") and link == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: {weights} is not in a training run's output directory" in err


def test_an_evaluation_goes_to_its_training_runs_store_and_nests_under_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("polyp")).info.run_id
    run_dir = tmp_path / "runs" / "a"
    (run_dir / "tracking").mkdir(parents=True)
    (run_dir / "tracking" / "sent.json").write_text(json.dumps({"sent": 0, "run_id": run_id}))
    record_store(run_dir, Store(uri, "polyp", "explicit"))
    store, link = scoring_store(None, None, tmp_path / "results", run_dir / "final.pt")
    assert store == Store(uri, "polyp", "run")
    assert link == {"trained_by": run_id, "trained_by_dir": str(run_dir.resolve()), PARENT_TAG: run_id}
    # another store named by a flag: still tagged with the run, not nested (that store lacks it)
    other = f"sqlite:///{tmp_path.resolve()}/other/mlflow.db"
    store, link = scoring_store(other, None, tmp_path / "results", run_dir / "final.pt")
    assert store.uri == other and store.experiment == "polyp" and PARENT_TAG not in link
    assert link["trained_by"] == run_id
    assert link_tags(None, uri) == {} and link_tags(RunRecord(run_dir, None, uri, None), uri) == {}


def test_run_names_say_what_ran() -> None:
    assert training_run_name("hiera_t", "video", "/x/runs/lr-high") == "hiera_t-video-lr-high"
    assert scoring_run_name("eval", "valid", 200, "runs/a/final.pt") == "eval-valid-step200"
    assert scoring_run_name("eval", None, None, "runs/a/best.pt") == "eval-best"
    assert (
        scoring_run_name("benchmark", "TestEasyDataset_Seen", 0, "w.pt")
        == "benchmark-TestEasyDataset_Seen-step0"
    )


WRITER = textwrap.dedent(
    """
    import sys
    from autosam2.tracking import MLflowLogger

    uri, name, spool = sys.argv[1:4]
    logger = MLflowLogger(uri, "together", run_name=name, spool_dir=spool, system_metrics=False,
                          max_backoff_s=1.0)
    for step in range(150):
        logger.log_metrics({"loss": step / 150}, step=step)
        logger.set_tags({f"t{step % 10}": str(step)})
        if step % 25 == 0:
            logger.log_params({f"p{step}": step})
    logger.close(flush_timeout_s=240)
    print(logger.outbox.unsent(), logger.run_id)
    """
)


def test_two_runs_writing_into_one_sqlite_store_at_once_lose_nothing(tmp_path: Path) -> None:
    """Two processes log into one fresh SQLite file at the same time (two trainings sharing the default
    store): `database is locked` and the race to create the schema are retried by the sender, and
    every record of both runs is there."""
    uri = default_tracking_uri(tmp_path / "runs" / "a")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, name, str(tmp_path / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    done = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in done]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("together").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert sorted(runs) == ["a", "b"]
    for (printed, _), name in zip(done, ("a", "b"), strict=True):
        left, run_id = printed.split()
        assert left == "0" and run_id == runs[name].info.run_id
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(150))
        run = client.get_run(run_id)
        assert len(run.data.params) == 6 and all(f"t{i}" in run.data.tags for i in range(10))
        assert run.info.status == "FINISHED"


def test_a_locked_sqlite_store_is_waited_for_not_refused() -> None:
    """MLflow turns SQLite's ``database is locked`` (after its 20 s busy timeout) into
    TEMPORARILY_UNAVAILABLE: the sender retries such a record instead of stepping over it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from autosam2.tracking.mlflow_store import is_refusal

    locked = MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE)
    assert not is_refusal(locked)
