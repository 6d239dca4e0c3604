"""Run tracking: a small MetricLogger interface; its MLflow implementation, made on rank 0 only.

Notes:
- Only rank 0 logs (`make_logger`): concurrent SQLite writers lock, and users compare one run per job.
- `MLflowLogger` drives an explicit `mlflow.MlflowClient`, never the fluent global state
  (`mlflow.start_run`), so the run id travels explicitly (a resumed job passes it back in) and a
  caller's own active run is left alone.
- If tracking fails, training goes on with a warning: MLflow and connection errors are caught, the
  first one warns once (naming the tracking URI and the error), later ones are only counted. After a
  connection-type failure, calls are dropped for a cool-down that doubles while the server stays
  down, and MLflow's HTTP retries and timeouts are bounded, so a dead server costs seconds, not the
  ~4 minutes per call of MLflow's defaults (7 retries, backoff factor 2, 120 s timeout).
- Bad arguments (a metric that is not a number, a missing artifact file) are the caller's bugs, not
  tracking failures: they raise, whatever the state of the server.
- System metrics (`system/cpu_utilization_percentage`, memory, disk, network; GPU when `pynvml`
  from `nvidia-ml-py` sees one) come from MLflow's `SystemMetricsMonitor`, a sampling thread this
  logger starts on its run and stops on `close`. `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, when
  exported, overrides the interval given here (MLflow reads it first).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit, urlunsplit

from autosam2.config import TrackingConfig

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

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

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


@runtime_checkable
class MetricLogger(Protocol):
    """Where a run's params, metrics, tags and artifacts go. Steps are global optimizer steps."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


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

    def close(self, status: str = "FINISHED") -> None:
        pass


# MLflow's client reads a tracking server's basic-auth credentials from these (or ~/.mlflow/credentials)
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def redact_uri(text: str | None) -> str | None:
    """`text` (a URI, or a message that holds some) with every ``user:password@`` of a URI replaced by
    ``***@``, for whatever is printed or logged."""
    return _USERINFO.sub(r"\1***@", text) if text else text


def take_uri_credentials(uri: str | None, env: dict[str, str] | None = None) -> str | None:
    """`uri` without its ``user:password@``, which move to MLflow's own variables in `env` (default this
    process's environment, which jobs and ranks inherit): so credentials never sit in a param, a config
    file, a log line or a job's pickled arguments. A URI without them is returned as it is."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    env = os.environ if env is None else env
    env[CREDENTIAL_ENV[0]] = unquote(parts.username or "")
    if parts.password is not None:
        env[CREDENTIAL_ENV[1]] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def default_tracking_uri(output_dir: str | Path) -> str:
    """SQLite store inside the run's output directory; the absolute path gives `sqlite:////...`."""
    return f"sqlite:///{Path(output_dir).resolve()}/mlflow.db"


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> `{"a.b.c": "value"}`, every value stringified; dataclasses are expanded too."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            # An empty mapping stays visible as "{}" rather than vanishing from the params.
            flat[name] = str(dict(value)) if isinstance(value, Mapping) else str(value)
    return flat


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (a deleted one is restored).

    Launchers call it before submitting so that ranks and array tasks never race to create it; a
    concurrent creation elsewhere (RESOURCE_ALREADY_EXISTS) is tolerated. Raises MlflowException
    when the store cannot be reached: a launcher should know before it submits.
    """
    from mlflow.exceptions import MlflowException

    _bound_http_env()
    client = _client(tracking_uri)
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


class MLflowLogger:
    """A MetricLogger writing one MLflow run; failures warn once and never reach the caller."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        cooldown_s: float = 60.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.shown_uri = redact_uri(tracking_uri)  # what messages name: never a password
        self.failures = 0  # calls that did not reach MLflow: failed, or dropped during a cool-down
        self._cooldown_s = cooldown_s
        self._next_cooldown_s = cooldown_s
        self._skip_until = 0.0
        self._warned = False
        self._client: Any = None  # None: disabled (construction failed, or closed)
        self._run_id: str | None = None
        self._monitor: Any = None
        self._params: dict[str, str] = {}  # already in the run: MLflow refuses a changed value

        _bound_http_env()
        try:
            self._client, self._run_id, resumed = self._open_run(experiment, run_name, run_id)
        except Exception as err:  # any failure to set up tracking leaves training running
            self._client = None
            self._failed("start the run", err, stacklevel=3)
            return
        if system_metrics:
            self._start_monitor(system_metrics_interval_s, resumed)

    # -- MetricLogger ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def enabled(self) -> bool:
        """False once construction failed or the run was closed: calls are then no-ops."""
        return self._client is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {key: _clip(value, MAX_PARAM_VALUE_CHARS) for key, value in flatten_config(params).items()}
        new = {k: v for k, v in flat.items() if k not in self._params}
        changed = {k: v for k, v in flat.items() if k in self._params and self._params[k] != v}
        if changed:
            # A resumed job may run with other overrides; MLflow refuses to change a param (and then
            # drops the whole batch), so the new values go to tags instead.
            _log.info("params changed since they were logged, kept as tags: %s", sorted(changed))
            self.set_tags({f"param_changed.{k}": v for k, v in changed.items()})
        if not new:
            return
        from mlflow.entities import Param

        items = list(new.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            if self._send(
                "log params",
                lambda chunk=chunk: self._client.log_batch(
                    self._run_id, params=[Param(k, v) for k, v in chunk]
                ),
            ):
                self._params.update(chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        # float() here: tensors and numpy scalars are welcome, a non-number is the caller's bug.
        items = [Metric(key, float(value), timestamp_ms, int(step)) for key, value in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i : i + MAX_METRICS_PER_BATCH]
            self._send("log metrics", lambda chunk=chunk: self._client.log_batch(self._run_id, metrics=chunk))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, _clip(value, MAX_TAG_VALUE_CHARS)) for key, value in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self._send("set tags", lambda chunk=chunk: self._client.log_batch(self._run_id, tags=chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file goes to `artifact_path/<name>`; a directory, with its contents, likewise."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        if path.is_dir():
            dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self._send("log artifacts", lambda: self._client.log_artifacts(self._run_id, str(path), dest))
        else:
            self._send(
                "log artifact", lambda: self._client.log_artifact(self._run_id, str(path), artifact_path)
            )

    def close(self, status: str = "FINISHED") -> None:
        """Stop system metrics and end the run with `status`; later calls are no-ops."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            # finish() joins the sampling thread and flushes its last samples; it logs its own errors.
            monitor.finish()
        if self._client is not None:
            # Not subject to the cool-down: the final status is worth one more (bounded) try.
            self._skip_until = 0.0
            self._send("end the run", lambda: self._client.set_terminated(self._run_id, status))
            self._client = None
        if self.failures:
            _log.info("MLflow tracking at %s: %d call(s) did not reach it", self.shown_uri, self.failures)

    # -- internals ------------------------------------------------------------------------------

    def _open_run(self, experiment: str, run_name: str | None, run_id: str | None) -> tuple[Any, str, bool]:
        """(client, run id, resumed): resume `run_id` when the store has it, else create a run."""
        from mlflow.exceptions import MlflowException

        client = _client(self.tracking_uri)
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                # E.g. the job resumed into another output dir, hence another SQLite store: a new
                # run that names the old one beats no tracking at all.
                warnings.warn(
                    f"MLflow run {run_id} not found at {self.shown_uri}; starting a new run",
                    TrackingWarning,
                    stacklevel=3,
                )
            else:
                if run.info.status != "RUNNING":
                    # Reopen it: a requeued job's run was ended (or left RUNNING when killed), and
                    # the system metrics monitor stops as soon as it sees a non-RUNNING run.
                    client.update_run(run_id, status="RUNNING")
                self._params = dict(run.data.params)
                return client, run_id, True
        experiment_id = ensure_experiment(self.tracking_uri, experiment)
        tags = {"resumed_from": run_id} if run_id is not None else None
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return client, run.info.run_id, False

    def _start_monitor(self, interval_s: float, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self._run_id,
                sampling_interval=interval_s,
                # A resumed run continues its system/ steps instead of overwriting them from 0.
                resume_logging=resumed,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as err:  # psutil missing, store hiccup: system metrics are optional
            self._monitor = None
            _log.warning("system metrics disabled for MLflow run %s: %s", self._run_id, redact_uri(repr(err)))

    def _send(self, what: str, call: Callable[[], object]) -> bool:
        """Run one MLflow call unless disabled or cooling down; True when it went through."""
        if self._client is None:
            return False
        if time.monotonic() < self._skip_until:
            self.failures += 1
            return False
        try:
            call()
        except Exception as err:  # tracking must never stop training; counted and warned once
            self._failed(what, err)
            if not _is_refusal(err):
                self._skip_until = time.monotonic() + self._next_cooldown_s
                # While the server stays down, each probe costs a bounded timeout: probe less often.
                self._next_cooldown_s = min(self._next_cooldown_s * 2, 16 * self._cooldown_s)
            return False
        if self._next_cooldown_s != self._cooldown_s:
            _log.info("MLflow tracking at %s reachable again", self.shown_uri)
            self._next_cooldown_s = self._cooldown_s
        return True

    def _failed(self, what: str, err: BaseException, stacklevel: int = 4) -> None:
        self.failures += 1
        if self._warned:
            _log.debug("MLflow tracking at %s: could not %s: %s", self.shown_uri, what, redact_uri(repr(err)))
            return
        self._warned = True
        disabled = (
            "tracking is disabled for this run"
            if self._client is None
            else "later failures are counted, not repeated"
        )
        message = redact_uri(str(err))  # MLflow's own errors name the URL it asked, userinfo included
        if len(message) > 500:
            message = message[:500] + "..."
        warnings.warn(
            f"MLflow tracking at {self.shown_uri} failed to {what}: {type(err).__name__}: {message} "
            f"-- training goes on; {disabled}",
            TrackingWarning,
            stacklevel=stacklevel,
        )


def make_logger(
    rank: int,
    enabled: bool,
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    system_metrics: bool = True,
    system_metrics_interval_s: float = 10.0,
) -> MetricLogger:
    """The MLflow logger on rank 0 with tracking enabled; a NullLogger everywhere else."""
    if rank != 0 or not enabled:
        return NullLogger()
    return MLflowLogger(
        tracking_uri,
        experiment,
        run_name=run_name,
        run_id=run_id,
        system_metrics=system_metrics,
        system_metrics_interval_s=system_metrics_interval_s,
    )


def start_run(
    cfg: TrackingConfig,
    out: Path,
    rank: int,
    run_id: str | None,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    config_file: Path,
) -> MetricLogger:
    """A training run's logger (MLflow on rank 0): resumed when `run_id` names one, else new with the
    flattened `params`; tagged with the git commit and `tags`; the merged config file as an artifact."""
    logger = make_logger(
        rank,
        cfg.enabled,
        cfg.uri or default_tracking_uri(out),
        cfg.experiment,
        cfg.run_name,
        run_id=run_id,
        system_metrics=cfg.system_metrics,
    )
    if run_id is None:
        logger.log_params(params)
    logger.set_tags({"git_commit": git_commit(), **tags})
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


def _bound_http_env() -> None:
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _client(tracking_uri: str) -> Any:
    import mlflow

    db = _sqlite_path(tracking_uri)
    if db is not None:
        # SQLite will not create the directory of its database file.
        db.parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri)


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores and in-memory SQLite."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = unquote(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path).resolve()


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store sit beside it; MLflow's default is ./mlruns in the caller's cwd."""
    db = _sqlite_path(tracking_uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def _is_refusal(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in _REFUSAL_CODES


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
