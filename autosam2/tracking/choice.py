"""Which MLflow store and experiment a command logs to, by one rule, and what a training run's output
directory records of its own, so that its resumption and the evaluations of its weights log beside it.

The rule (`choose_store`), for every command that logs (train, the launcher, evaluate, score, benchmark):

1. an explicit value: ``tracking.uri`` / ``tracking.experiment`` of the config, ``--tracking-uri`` /
   ``--experiment`` of a command;
2. MLflow's own variables, ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``;
3. the training run's record (`RunRecord`): a resumed training run's own output directory, or the output
   directory of the run that wrote the weights an evaluation scores;
4. the default: SQLite ``mlflow.db`` in the parent of the output directory (`default_tracking_uri`), so the
   runs written side by side (``runs/a``, ``runs/b``) share one store; experiment ``autosam2``.

A training run records its choice in ``OUT/tracking/store.json``; its run id is where the outbox records it
(`outbox.recorded_run`). A run directory written before that file existed is read from its ``config.yaml``
and its own ``OUT/mlflow.db``, so such a run resumes, and is evaluated, where it started.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from autosam2.tracking.credentials import take_uri_credentials
from autosam2.tracking.outbox import FOLDER, recorded_run

URI_VARIABLE = "MLFLOW_TRACKING_URI"
EXPERIMENT_VARIABLE = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "autosam2"
DATABASE = "mlflow.db"  # the default store's file, in the parent of the output directory
RECORD = "store.json"  # OUT/tracking/store.json: the store and experiment a training run logs to
OUTPUT_TAG = "output_dir"  # every run's tag: the folder it wrote
PARENT_TAG = "mlflow.parentRunId"  # MLflow's UI nests a run under the run this tag names


@dataclass(frozen=True)
class Store:
    """Where a run is logged: the tracking URI (no credentials), the experiment, and which rule chose
    the URI ("explicit", "environment", "run", "default")."""

    uri: str
    experiment: str
    source: str


@dataclass(frozen=True)
class RunRecord:
    """What a training run's output directory records of its tracking: the run id (None before the store
    answered) and the store and experiment (None when it does not say)."""

    run_dir: Path
    run_id: str | None
    uri: str | None
    experiment: str | None


def default_tracking_uri(output_dir: str | Path) -> str:
    """SQLite ``mlflow.db`` in the parent of `output_dir` (absolute: ``sqlite:////...``), shared by every
    output directory beside it."""
    return f"sqlite:///{Path(output_dir).resolve().parent / DATABASE}"


def choose_store(
    uri: str | None, experiment: str | None, output_dir: str | Path, run: RunRecord | None = None
) -> Store:
    """The store and experiment by the module's rule: `uri` / `experiment` when given, else MLflow's
    variables, else `run`'s record, else the default of `output_dir`. Credentials in a URI move to MLflow's
    variables (`take_uri_credentials`)."""
    candidates = (
        ("explicit", uri),
        ("environment", os.environ.get(URI_VARIABLE)),
        ("run", run.uri if run is not None else None),
        ("default", default_tracking_uri(output_dir)),
    )
    source, value = next((source, value) for source, value in candidates if value)
    recorded = run.experiment if run is not None else None
    name = experiment or os.environ.get(EXPERIMENT_VARIABLE) or recorded or DEFAULT_EXPERIMENT
    return Store(take_uri_credentials(value), name, source)


def record_store(output_dir: str | Path, store: Store) -> None:
    """``OUT/tracking/store.json``: the store and experiment the run in OUT logs to (a training run, or a
    scoring run whose records wait there for `autosam2 sync`)."""
    from autosam2.atomic import atomic_write_json

    folder = Path(output_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RECORD, {"uri": store.uri, "experiment": store.experiment})


def read_run(run_dir: str | Path) -> RunRecord | None:
    """The tracking record of a training run's output directory; None when it holds none (not a run of
    ours, or one with tracking off)."""
    run_dir = Path(run_dir).resolve()
    folder = run_dir / FOLDER
    try:
        saved = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict):  # a value that is no name counts as none
        uri, experiment = (
            v if isinstance(v, str) and v else None for v in (saved.get("uri"), saved.get("experiment"))
        )
    else:
        uri, experiment = _config_choice(run_dir)
        if uri is None and (run_dir / DATABASE).is_file():  # a run that kept its store in its own folder
            uri = f"sqlite:///{run_dir / DATABASE}"
    if _gone(uri):  # the folders moved since (the store with them): the default finds it where it is now
        uri = None
    run_id = recorded_run(folder)
    if run_id is None and uri is None:
        return None
    return RunRecord(run_dir, run_id, uri, experiment)


def _gone(uri: str | None) -> bool:
    """`uri` names a SQLite file that is not there."""
    from autosam2.tracking.mlflow_store import sqlite_path

    db = sqlite_path(uri) if uri else None
    return db is not None and not db.is_file()


def _config_choice(run_dir: Path) -> tuple[str | None, str | None]:
    """``tracking.uri`` and ``tracking.experiment`` of a run directory's config.yaml, read as plain YAML
    (None each where it has none)."""
    import yaml

    try:
        tracking = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("tracking") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None, None
    uri, experiment = tracking.get("uri"), tracking.get("experiment")
    return (uri if isinstance(uri, str) else None), (experiment if isinstance(experiment, str) else None)


def scoring_store(
    uri: str | None, experiment: str | None, output_dir: str | Path, weights: str | Path | None
) -> tuple[Store, dict[str, str]]:
    """The store of a command that scores `weights` (evaluate, benchmark, score) and the tags linking its
    runs to the training run that wrote them (`link_tags`): that run's store and experiment unless a flag
    or MLflow's variables name others. Weights of no run of ours (a copied or foreign file): said once,
    and the store is chosen without a run."""
    run = read_run(Path(weights).parent) if weights is not None else None
    store = choose_store(uri, experiment, output_dir, run)
    if weights is not None and run is None:
        print(
            f"note: {weights} is not in a training run's output directory (no {FOLDER}/ record there): "
            f"MLflow runs go to {store.uri}, experiment {store.experiment!r}, unlinked",
            file=sys.stderr,
            flush=True,
        )
    return store, link_tags(run, store.uri)


def link_tags(run: RunRecord | None, uri: str) -> dict[str, str]:
    """Tags linking a run to training run `run`: ``trained_by`` (its id) and ``trained_by_dir``, and
    MLflow's parent tag, which nests the run under it in the UI, when the store at `uri` holds it."""
    if run is None or run.run_id is None:
        return {}
    tags = {"trained_by": run.run_id, "trained_by_dir": str(run.run_dir)}
    if _store_has(uri, run.run_id):
        tags[PARENT_TAG] = run.run_id
    return tags


def _store_has(uri: str, run_id: str) -> bool:
    """Whether the tracking store at `uri` holds run `run_id` (False when it cannot be asked)."""
    from mlflow.exceptions import MlflowException

    from autosam2.tracking.mlflow_store import bound_http_env, open_client

    bound_http_env()
    try:
        open_client(uri).get_run(run_id)
    except MlflowException:  # no such run there, or the store refuses: the tags still name it
        return False
    return True


def training_run_name(variant: object, mode: object, output_dir: str | Path) -> str:
    """A training run's name: its model size, clip mode and output folder (``hiera_t-video-run1``)."""
    return f"{variant}-{mode}-{Path(output_dir).resolve().name}"


def scoring_run_name(command: str, split: str | None, step: object, weights: str | Path) -> str:
    """An evaluation's or benchmark split's name: the command, the split, and the training step of the
    weights (``eval-valid-step200``; the weights file's stem where it records no step)."""
    at = f"step{step}" if step is not None else Path(weights).stem
    return "-".join(part for part in (command, split, at) if part)
