"""Run tracking: the MetricLogger interface, its null logger, and the factories a run calls; the MLflow
logger behind it, made on rank 0 only.

Only rank 0 logs (`make_logger`): concurrent SQLite writers lock, and users compare one run per job.
The parts, one module each: `mlflow_logger` (the MLflow logger, whose calls only append to an outbox),
`outbox` (the records on disk), `sender` (the thread that delivers them), `mlflow_store` (the client,
experiments and runs), `choice` (which store and experiment: flags, MLflow's variables, the run's record),
`system_metrics` (the sampler), `credentials` (user and password of a URI).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from autosam2.config import TrackingConfig
from autosam2.tracking.choice import (
    OUTPUT_TAG,
    Store,
    choose_store,
    default_tracking_uri,
    read_run,
    record_store,
    scoring_run_name,
    scoring_store,
    training_run_name,
)
from autosam2.tracking.credentials import redact_uri, take_uri_credentials
from autosam2.tracking.mlflow_logger import MLflowLogger, flatten_config
from autosam2.tracking.mlflow_store import TrackingWarning, ensure_experiment
from autosam2.tracking.outbox import FOLDER

__all__ = [
    "MLflowLogger",
    "MetricLogger",
    "NullLogger",
    "OUTPUT_TAG",
    "Store",
    "TrackingWarning",
    "choose_store",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten_config",
    "git_commit",
    "make_logger",
    "read_run",
    "record_store",
    "redact_uri",
    "scoring_run_name",
    "scoring_store",
    "start_run",
    "take_uri_credentials",
    "training_run_name",
]


@runtime_checkable
class MetricLogger(Protocol):
    """Where a run's params, metrics, tags and artifacts go. Steps are global optimizer steps."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED", flush_timeout_s: float | None = None) -> None: ...


class NullLogger:
    """Logs nothing: the logger of non-zero ranks, and of runs with tracking disabled."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED", flush_timeout_s: float | None = None) -> None:
        pass


def make_logger(
    rank: int, enabled: bool, tracking_uri: str, experiment: str, run_name: str | None = None, **options: Any
) -> MetricLogger:
    """The MLflow logger on rank 0 with tracking enabled (`options` go to `MLflowLogger`); a NullLogger
    everywhere else."""
    if rank != 0 or not enabled:
        return NullLogger()
    return MLflowLogger(tracking_uri, experiment, run_name=run_name, **options)


def start_run(
    cfg: TrackingConfig,
    out: Path,
    rank: int,
    run_id: str | None,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    config_file: Path,
    name: str | None = None,
) -> MetricLogger:
    """A training run's logger (MLflow on rank 0, its outbox in ``out/tracking``) in the store and
    experiment `choose_store` picks for `out` (recorded there for its resumption and its evaluations):
    resumed when `run_id` names one, else new, named ``tracking.run_name`` or `name`; the flattened
    `params` (a resumed run's changed values go to tags, see `MLflowLogger.log_params`); tagged with the
    git commit, `out` (``output_dir``) and `tags`; the config file as an artifact."""
    if rank != 0 or not cfg.enabled:
        return NullLogger()
    store = choose_store(cfg.uri, cfg.experiment, out, read_run(out))
    record_store(out, store)
    logger = MLflowLogger(
        store.uri,
        store.experiment,
        run_name=cfg.run_name or name,
        run_id=run_id,
        system_metrics=cfg.system_metrics,
        spool_dir=out / FOLDER,
        flush_timeout_s=cfg.flush_timeout_s,
    )
    logger.log_params(params)
    logger.set_tags({"git_commit": git_commit(), OUTPUT_TAG: str(Path(out).resolve()), **tags})
    logger.log_artifact(config_file)
    return logger


def git_commit() -> str:
    """The commit of the code that runs, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
