"""The MLflow tracking store as our loggers reach it: a client with bounded HTTP retries, the store's limits
and refusals, and experiments and runs opened or resumed.

An explicit `mlflow.MlflowClient` does every call, never MLflow's fluent global state (`mlflow.start_run`),
so a run id travels explicitly (a resumed job passes it back in) and a caller's own active run is left
alone. mlflow is imported inside the functions that call it: importing this module loads nothing heavy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from autosam2.tracking.credentials import redact_uri

_log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): longer values are refused, bigger batches too.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# MLflow reads these per HTTP request from the environment (mlflow.utils.rest_utils.http_request),
# for the tracking API and for proxied artifact uploads alike, so they can only be set process-wide.
# They are defaults: a value the user exported wins. With them a refused connection fails in ~3 s
# (retries after 0 s and ~2 s) and a silent one in ~35 s (3 attempts x 10 s), instead of minutes.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

# MLflow error codes meaning "the store answered and refused this request": the server is up, so
# these do not start the cool-down that a connection failure does.
_REFUSAL_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
    }
)


class TrackingWarning(UserWarning):
    """Tracking failed; training goes on without it."""


def is_refusal(err: BaseException) -> bool:
    """The store answered and refused the request (a bad value, a missing run), as opposed to not answering."""
    return getattr(err, "error_code", None) in _REFUSAL_CODES


def bound_http_env() -> None:
    """Set MLflow's HTTP retry and timeout variables (HTTP_ENV_DEFAULTS) where the user has not."""
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def open_client(tracking_uri: str) -> Any:
    """An `mlflow.MlflowClient` of `tracking_uri`. A SQLite store's folder is created first, and the client
    is made holding ``<database>.lock`` beside it: making one creates or upgrades the store's tables, and
    two processes doing it at once in one new store collide (``duplicate column name``)."""
    import mlflow

    db = sqlite_path(tracking_uri)
    if db is None:
        return mlflow.MlflowClient(tracking_uri)
    # SQLite will not create the directory of its database file.
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return mlflow.MlflowClient(tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (a deleted one is restored).

    Launchers call it before submitting so that ranks and array tasks never race to create it; a
    concurrent creation elsewhere (RESOURCE_ALREADY_EXISTS) is tolerated. Raises MlflowException
    when the store cannot be reached: a launcher should know before it submits.
    """
    from mlflow.exceptions import MlflowException

    bound_http_env()
    client = open_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        # Runs cannot be created in a deleted experiment; the user asked for this name again.
        _log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def open_run(
    client: Any,
    tracking_uri: str,
    experiment: str,
    run_name: str | None,
    run_id: str | None,
    start_ms: int | None = None,
) -> tuple[str, Any]:
    """(run id, the resumed run or None): resume `run_id` when the store has it, else create a run
    (started at `start_ms`, default now: a run opened late by the sender keeps its real start)."""
    from mlflow.exceptions import MlflowException

    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # E.g. the job resumed into another output dir, hence another SQLite store: a new
            # run that names the old one beats no tracking at all.
            warnings.warn(
                f"MLflow run {run_id} not found at {redact_uri(tracking_uri)}; starting a new run",
                TrackingWarning,
                stacklevel=4,
            )
        else:
            if run.info.status != "RUNNING":
                # Reopen it: a requeued job's run was ended (or left RUNNING when killed).
                client.update_run(run_id, status="RUNNING")
            return run_id, run
    experiment_id = ensure_experiment(tracking_uri, experiment)
    tags = {"resumed_from": run_id} if run_id is not None else None
    return client.create_run(
        experiment_id, start_time=start_ms, run_name=run_name, tags=tags
    ).info.run_id, None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores and in-memory SQLite."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = unquote(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path).resolve()


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store sit beside it; MLflow's default is ./mlruns in the caller's cwd."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None
