"""Run tracking: a small MetricLogger interface; its MLflow implementation, made on rank 0 only.

Notes:
- Only rank 0 logs (`make_logger`): concurrent SQLite writers lock, and users compare one run per job.
- `MLflowLogger` drives an explicit `mlflow.MlflowClient`, never the fluent global state
  (`mlflow.start_run`), so the run id travels explicitly (a resumed job passes it back in) and a
  caller's own active run is left alone.
- Nothing waits on the store: every call appends a record to an outbox file (`autosam2.outbox`, in
  ``OUT/tracking``: bounded memory, it survives the process) and returns; a sender thread delivers the
  records in order, batched, retrying with backoff (0.5 s doubling to 30 s) while the store is down or
  hung. `close` waits up to `flush_timeout_s` for it; what is left is replayed later with
  `autosam2 sync OUT`. Delivery is at least once; it is exactly once in the run because MLflow's stores
  keep one row per identical (key, value, timestamp, step) metric, params are only logged once, and an
  artifact's upload overwrites the same path.
- If tracking fails, training goes on with a warning: the first failure warns once (naming the
  tracking URI and the error), later ones are only counted. A record the store refuses (a bad name) is
  stepped over. MLflow's HTTP retries and timeouts are bounded (below), so a hung server holds the
  sender, never the loop, for seconds rather than MLflow's ~4 minutes per call.
- Bad arguments (a metric that is not a number, a missing artifact file) are the caller's bugs, not
  tracking failures: they raise, whatever the state of the server.
- System metrics (`system/cpu_utilization_percentage`, memory, disk, network; GPU when `pynvml`
  from `nvidia-ml-py` sees one) are sampled by MLflow's own monitors on a thread this logger starts
  and stops on `close`, and go through the outbox like any metric. `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`,
  when exported, overrides the interval given here.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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
CHANGED_TAG = "param_changed."  # + a param's key: its value in effect, when a resumed run changed it

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
    """A MetricLogger writing one MLflow run through an outbox: a logging call appends a record to
    ``outbox.jsonl`` (`autosam2.outbox`) and returns; a sender thread delivers the records in order,
    retrying with backoff while the store is unreachable, so an outage costs the training loop nothing
    and loses nothing. `close` waits up to `flush_timeout_s` for the sender to catch up; what it did not
    send stays in the outbox for `autosam2 sync`. Failures warn once and never reach the caller.

    `spool_dir`: where the outbox lives (``OUT/tracking`` for a run); None: a private temporary folder,
    removed at `close` (nothing to replay later)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        spool_dir: str | Path | None = None,
        flush_timeout_s: float = 60.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        from autosam2.outbox import Outbox

        self.tracking_uri = tracking_uri
        self.shown_uri = redact_uri(tracking_uri)  # what messages name: never a password
        self.failures = 0  # calls that did not reach MLflow at the first try, and records given up on
        self.flush_timeout_s = flush_timeout_s
        self._warned = False
        self._closed = False
        self._run_id: str | None = None
        self._params: dict[str, str] = {}  # already in the run: MLflow refuses a changed value
        self._changed: set[str] = set()  # params whose value in effect is in a `param_changed.` tag
        self._temporary = spool_dir is None
        folder = Path(tempfile.mkdtemp(prefix="autosam2-tracking-")) if spool_dir is None else Path(spool_dir)
        self.outbox = Outbox(folder)
        self._client: Any = None
        self._sampler: _SystemSampler | None = None
        self.flush_s = 0.0  # how long `close` waited for the sender

        _bound_http_env()
        next_system_step = self.outbox.next_system_step()
        try:
            self._client = _client(tracking_uri)
            self._run_id, run = open_run(self._client, tracking_uri, experiment, run_name, run_id)
            self.outbox.append({"op": "opened", "run": self._run_id})
            if run is not None:
                self._params = dict(run.data.params)
                self._changed = {
                    k.removeprefix(CHANGED_TAG) for k in run.data.tags if k.startswith(CHANGED_TAG)
                }
                if next_system_step == 0:  # a resumed run continues its system/ steps, not from 0
                    next_system_step = 1 + max(
                        (m.step for m in run.data._metric_objs if m.key.startswith("system/")), default=-1
                    )
        except Exception as err:  # the store is down or refuses: decided below
            if self._client is None or _is_refusal(err):
                self._client = None
                self._failed("start the run", err, stacklevel=3)
                self._closed = True
                self.outbox.close()
                if self._temporary:
                    shutil.rmtree(folder, ignore_errors=True)
                return
            # unreachable: the sender opens the run when the store answers; records wait for it
            self._failed("start the run", err, stacklevel=3)
            self.outbox.append(
                {"op": "start", "experiment": experiment, "name": run_name, "resume": run_id, "t": _now_ms()}
            )
        self._sender = _Sender(self.outbox, self._client, self.shown_uri, self._failed, max_backoff_s)
        self._sender.start()
        if system_metrics:
            self._sampler = _SystemSampler(self, system_metrics_interval_s, next_system_step)

    # -- MetricLogger ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The run's id; None while the store has not yet answered (the sender opens the run)."""
        return self._run_id or (self._sender.opened if hasattr(self, "_sender") else None)

    @property
    def enabled(self) -> bool:
        """False once construction was refused or the run was closed: calls are then no-ops."""
        return not self._closed

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {key: _clip(value, MAX_PARAM_VALUE_CHARS) for key, value in flatten_config(params).items()}
        new = {k: v for k, v in flat.items() if k not in self._params}
        changed = {
            k: v
            for k, v in flat.items()
            if k in self._params and (self._params[k] != v or k in self._changed)
        }
        if changed:
            # A resumed job may run with other overrides; MLflow refuses to change a param (and then
            # drops the whole batch), so the values in effect go to tags instead (a value changed back
            # too: its tag must not keep the one before).
            _log.info("params changed since they were logged, kept as tags: %s", sorted(changed))
            self.set_tags({f"{CHANGED_TAG}{k}": v for k, v in changed.items()})
            self._changed |= changed.keys()
        if new:
            self._params.update(new)
            self._append({"op": "params", "params": new})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # float() here: tensors and numpy scalars are welcome, a non-number is the caller's bug.
        values = {key: float(value) for key, value in metrics.items()}
        self._append({"op": "metrics", "step": int(step), "t": _now_ms(), "metrics": values})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._append({"op": "tags", "tags": {k: _clip(v, MAX_TAG_VALUE_CHARS) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file goes to `artifact_path/<name>`; a directory, with its contents, likewise. The file as
        it is now is what gets sent (it is linked into the outbox)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        if not self.enabled:
            return
        try:
            place = self.outbox.spool(path)
        except OSError as err:
            self._failed("keep an artifact in the outbox", err)
            return
        self._append({"op": "artifact", "file": place, "dir": path.is_dir(), "path": artifact_path})

    def close(self, status: str = "FINISHED", flush_timeout_s: float | None = None) -> None:  # noqa: C901
        """Stop system metrics, end the run with `status` and wait (up to `flush_timeout_s`) for every
        record to reach the store; later calls are no-ops."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self._closed:
            return
        if self._sampler is not None:
            self._sampler.stop()
        self._append({"op": "end", "status": status, "t": _now_ms()})
        self._closed = True
        timeout = self.flush_timeout_s if flush_timeout_s is None else flush_timeout_s
        start = time.monotonic()
        self._sender.finish(timeout)
        self.flush_s = time.monotonic() - start
        left = self.outbox.unsent()
        self.outbox.close()
        if left and not self._temporary:
            print(
                f"warning: MLflow tracking at {self.shown_uri} did not take {left} record(s) within "
                f"{timeout:.0f} s; they are kept in {self.outbox.folder}: send them with "
                f"`autosam2 sync {self.outbox.folder.parent}`",
                file=sys.stderr,
                flush=True,
            )
        elif self._temporary:
            shutil.rmtree(self.outbox.folder, ignore_errors=True)
        if self.failures:
            _log.info(
                "MLflow tracking at %s: %d call(s) did not reach it at first", self.shown_uri, self.failures
            )

    # -- internals ------------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record.setdefault("run", self._run_id)
        try:
            self.outbox.append(record)
        except OSError as err:  # a full disk: this record is lost, training goes on
            self._failed(f"keep a record in {self.outbox.path}", err)
            return
        self._sender.wake.set()

    def _failed(self, what: str, err: BaseException, stacklevel: int = 4) -> None:
        self.failures += 1
        if self._warned:
            _log.debug("MLflow tracking at %s: could not %s: %s", self.shown_uri, what, redact_uri(repr(err)))
            return
        self._warned = True
        message = redact_uri(str(err))  # MLflow's own errors name the URL it asked, userinfo included
        if len(message) > 500:
            message = message[:500] + "..."
        then = (
            "tracking is disabled for this run"
            if self._client is None
            else f"records wait in {self.outbox.folder} and are retried; later failures are counted, not repeated"
        )
        warnings.warn(
            f"MLflow tracking at {self.shown_uri} failed to {what}: {type(err).__name__}: {message} "
            f"-- training goes on; {then}",
            TrackingWarning,
            stacklevel=stacklevel,
        )


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


class _QuietRetries(logging.Filter):
    """urllib3 logs a warning for each retry of a request; the sender's probes of a store that is down
    would fill a job's log with them (the first failure is warned about once, by the logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            threading.current_thread().name == "mlflow-sender" and record.getMessage().startswith("Retrying")
        )


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


class _Sender(threading.Thread):
    """Delivers the outbox's records in order: consecutive ones of a kind in one MLflow batch; a store
    that does not answer is retried with backoff (0.5 s doubling up to `max_backoff_s`); a record it
    refuses (a bad value) is stepped over with a warning. Also `autosam2 sync`'s engine."""

    def __init__(
        self,
        outbox: Any,
        client: Any,
        shown_uri: str,
        on_failure: Callable[[str, BaseException], None],
        max_backoff_s: float = 30.0,
    ):
        super().__init__(name="mlflow-sender", daemon=True)
        self.outbox, self.client, self.shown_uri, self.on_failure = outbox, client, shown_uri, on_failure
        self.max_backoff_s = max_backoff_s
        self.opened: str | None = None  # the run a `start` record of this process opened
        self.wake = threading.Event()
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self.run_id: str | None = self.outbox.state.get("run_id")
        self.sent = 0  # records delivered by this sender
        self.longest_outage_s = 0.0

    def finish(self, timeout: float) -> bool:
        """Deliver what is left, for up to `timeout` s; True when everything went."""
        self._closing.set()
        self.wake.set()
        self.join(timeout)
        if self.is_alive():
            self._abandon.set()  # it stops at its next chance; the outbox keeps the rest
            return False
        return True

    def run(self) -> None:
        delay, down_since = 0.0, None
        one_by_one = 0  # after a refused batch: its records go one at a time, so only the bad one is lost
        while not self._abandon.is_set():
            batch = self.outbox.pending(1 if one_by_one else 1000)
            if not batch:
                if self._closing.is_set():
                    return
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            end, call, what, count = self._next_call(batch)
            if call is None:  # not a record (cut by a kill, or edited): said, stepped over, not sent
                self.on_failure(
                    what, ValueError(f"{self.outbox.path}: the line before byte {end} is not a record")
                )
                self._mark(end)
                continue
            try:
                call()
            except Exception as err:  # tracking must never stop training
                if _is_refusal(err) and count > 1:  # which record? each alone, so only that one is lost
                    one_by_one = count
                    continue
                self.on_failure(what, err)
                if _is_refusal(err):  # the store answered no: this record will never go
                    self._mark(end)
                    one_by_one = max(0, one_by_one - 1)
                    continue
                down_since = down_since or time.monotonic()
                delay = min(max(0.5, delay * 2), self.max_backoff_s)
                self._abandon.wait(delay)
                continue
            if down_since is not None:
                self.longest_outage_s = max(self.longest_outage_s, time.monotonic() - down_since)
                _log.info("MLflow tracking at %s reachable again", self.shown_uri)
                delay, down_since = 0.0, None
            self.sent += count
            self._mark(end)
            one_by_one = max(0, one_by_one - count)

    def _mark(self, end: int) -> None:
        """Move the watermark past what went; kept in memory when the disk refuses it (a full disk: after
        a restart those records go again, and the store keeps them once)."""
        try:
            self.outbox.mark_sent(end, run_id=self.run_id)
        except OSError as err:
            self.on_failure(f"record what was sent in {self.outbox.folder}", err)

    def _next_call(self, batch: list[tuple[int, dict[str, Any] | None]]) -> tuple[int, Any, str, int]:
        """(offset past the records it covers, the call or None, what it does, how many records)."""
        from mlflow.entities import Metric, Param, RunTag

        end, first = batch[0]
        if first is None:  # a line cut by a kill
            return end, None, "read a record", 1
        op = first["op"]
        run = first.get("run") or self.run_id
        if op == "opened":
            return end, lambda: setattr(self, "run_id", first["run"]), "open the run", 1
        if op == "start":
            return end, lambda: self._start(first), "start the run", 1
        if op == "end":
            return (
                end,
                lambda: self.client.set_terminated(run, first["status"], first.get("t")),
                "end the run",
                1,
            )
        if op == "artifact":

            def upload() -> None:
                local = self.outbox.folder / first["file"]
                if first["dir"]:
                    dest = f"{first['path']}/{local.name}" if first["path"] else local.name
                    self.client.log_artifacts(run, str(local), dest)
                else:
                    self.client.log_artifact(run, str(local), first["path"])
                self.outbox.unspool(first["file"])

            return end, upload, "log an artifact", 1
        # params, tags and metrics: consecutive records of the kind and run, up to MLflow's batch limits
        limit = MAX_METRICS_PER_BATCH if op == "metrics" else MAX_PARAMS_TAGS_PER_BATCH
        items: list[Any] = []
        count = 0
        for offset, record in batch:
            if record is None or record["op"] != op or (record.get("run") or self.run_id) != run:
                break
            if op == "metrics":
                new = [Metric(k, v, record["t"], record["step"]) for k, v in record["metrics"].items()]
            elif op == "params":
                new = [Param(k, v) for k, v in record["params"].items()]
            else:
                new = [RunTag(k, v) for k, v in record["tags"].items()]
            if items and len(items) + len(new) > limit:
                break
            items += new
            end, count = offset, count + 1
        what = {"metrics": "log metrics", "params": "log params", "tags": "set tags"}[op]
        chunks = [items[i : i + limit] for i in range(0, len(items), limit)]  # one record can exceed it

        def send() -> None:
            for chunk in chunks:
                self.client.log_batch(run, **{op: chunk})

        return end, send, what, count

    def _start(self, record: dict[str, Any]) -> None:
        uri = self.client.tracking_uri  # without credentials: those are in the environment
        self.run_id = None  # refused: the records that follow have no run to go to, and are stepped over
        self.run_id, _ = open_run(
            self.client, uri, record["experiment"], record["name"], record["resume"], record.get("t")
        )
        self.opened = self.run_id
        _log.info("MLflow run %s opened at %s", self.run_id, self.shown_uri)


class _SystemSampler(threading.Thread):
    """System metrics (``system/cpu_utilization_percentage``, memory, disk, network; GPU when MLflow's
    GPU monitor finds one) sampled by MLflow's own monitors every `interval_s` and logged through the
    outbox like any metric, so an outage loses none and the sampling never stops for one.
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, when exported, overrides the interval (as in MLflow)."""

    def __init__(self, logger: MLflowLogger, interval_s: float, first_step: int):
        super().__init__(name="system-metrics", daemon=True)
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.logger = logger
        self.interval_s = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or interval_s
        self.step = first_step
        self._halt = threading.Event()
        try:
            self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        except Exception as err:  # psutil missing: system metrics are optional
            _log.warning("system metrics disabled: %s", err)
            return
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA GPU, or no pynvml
            pass
        self.start()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            metrics: dict[str, float] = {}
            try:
                for monitor in self.monitors:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
            except Exception as err:  # a monitor that fails once fails again: stop sampling
                _log.warning("system metrics stopped: %s", err)
                return
            self.logger.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self.step)
            self.step += 1

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


def sync(
    output_dir: str | Path, tracking_uri: str | None = None, timeout_s: float = 600.0
) -> tuple[int, int]:
    """Send what a run's outbox (``OUTPUT_DIR/tracking``) still holds to its tracking store (`tracking_uri`,
    default the one in ``OUTPUT_DIR/config.yaml``); returns (records sent, records left)."""
    from autosam2.outbox import Outbox

    folder = Path(output_dir) / "tracking"
    if not (folder / "outbox.jsonl").is_file():
        raise FileNotFoundError(
            errno.ENOENT,
            f"no tracking outbox here (is {output_dir} a run's output dir?)",
            str(folder / "outbox.jsonl"),
        )
    uri = tracking_uri or _uri_of_run(Path(output_dir))
    uri = take_uri_credentials(uri)
    _bound_http_env()
    outbox = Outbox(folder)
    errors: list[str] = []

    def failed(what: str, err: BaseException) -> None:
        if not errors:
            print(
                f"sync: could not {what} at {redact_uri(uri)}: {redact_uri(str(err))[:500]}", file=sys.stderr
            )
        errors.append(what)

    before = outbox.unsent()
    sender = _Sender(outbox, _client(uri), redact_uri(uri), failed)
    sender.start()
    sender.finish(timeout_s)
    left = outbox.unsent()
    outbox.close()
    return before - left, left


def _uri_of_run(output_dir: Path) -> str:
    from autosam2.config import load_config

    config = output_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(errno.ENOENT, "missing; pass --tracking-uri", str(config))
    return load_config(config, []).tracking.uri or default_tracking_uri(output_dir)


def sync_main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="autosam2 sync",
        description="send the tracking records a run could not deliver (its MLflow server was down) to its run",
    )
    parser.add_argument("output_dir", type=Path, help="the run's output directory (train.output_dir)")
    parser.add_argument("--tracking-uri", default=None, help="default: the run's tracking.uri in config.yaml")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to keep trying (default 600)")
    args = parser.parse_args(argv)
    sent, left = sync(args.output_dir, args.tracking_uri, args.timeout)
    if left:
        print(
            f"sync: {sent} record(s) sent, {left} still waiting in {args.output_dir / 'tracking'}",
            file=sys.stderr,
        )
        return 1
    print(f"sync: {sent} record(s) sent; the outbox of {args.output_dir} is empty", flush=True)
    return 0


def make_logger(
    rank: int,
    enabled: bool,
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    system_metrics: bool = True,
    system_metrics_interval_s: float = 10.0,
    spool_dir: str | Path | None = None,
    flush_timeout_s: float = 60.0,
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
        spool_dir=spool_dir,
        flush_timeout_s=flush_timeout_s,
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
    """A training run's logger (MLflow on rank 0, its outbox in ``out/tracking``): resumed when `run_id`
    names one, else new; the flattened `params` (a resumed run's changed values go to tags, see
    `MLflowLogger.log_params`); tagged with the git commit and `tags`; the config file as an artifact."""
    logger = make_logger(
        rank,
        cfg.enabled,
        cfg.uri or default_tracking_uri(out),
        cfg.experiment,
        cfg.run_name,
        run_id=run_id,
        system_metrics=cfg.system_metrics,
        spool_dir=out / "tracking",
        flush_timeout_s=cfg.flush_timeout_s,
    )
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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_refusal(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in _REFUSAL_CODES


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
