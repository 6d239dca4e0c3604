"""The MLflow logger: a MetricLogger whose calls only append records to the run's outbox, delivered by a
sender thread, so that nothing the training loop does waits on the tracking store.

- Every call appends a record to an outbox file (`autosam2.tracking.outbox`, in ``OUT/tracking``: bounded memory, it
  survives the process) and returns; a sender thread (`autosam2.tracking.sender`) delivers the records in order, batched,
  retrying with backoff (0.5 s doubling to 30 s) while the store is down or hung. `close` waits up to
  `flush_timeout_s` for it; what is left is replayed later with `autosam2 sync OUT`.
- If tracking fails, training goes on with a warning: the first failure warns once (naming the
  tracking URI and the error), later ones are only counted.
- Bad arguments (a metric that is not a number, a missing artifact file) are the caller's bugs, not
  tracking failures: they raise, whatever the state of the server.
- System metrics (`autosam2.tracking.system_metrics`) are sampled on a thread this logger starts and stops on `close`, and
  go through the outbox like any metric. `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, when exported,
  overrides the interval given here.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autosam2.config import TrackingConfig
from autosam2.tracking.credentials import redact_uri
from autosam2.tracking.mlflow_store import (
    MAX_PARAM_VALUE_CHARS,
    MAX_TAG_VALUE_CHARS,
    TrackingWarning,
    bound_http_env,
    is_refusal,
    open_client,
    open_run,
)
from autosam2.tracking.outbox import SYSTEM_PREFIX, Outbox
from autosam2.tracking.sender import Sender
from autosam2.tracking.system_metrics import SystemSampler

_log = logging.getLogger(__name__)

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
CHANGED_TAG = "param_changed."  # + a param's key: its value in effect, when a resumed run changed it


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


class MLflowLogger:
    """A MetricLogger writing one MLflow run through an outbox: a logging call appends a record to
    ``outbox.jsonl`` (`autosam2.tracking.outbox`) and returns; a sender thread delivers the records in order,
    retrying with backoff while the store is unreachable, so an outage costs the training loop nothing
    and loses nothing. `close` waits up to `flush_timeout_s` for the sender to catch up; what it did not
    send stays in the outbox for `autosam2 sync`. Failures warn once and never reach the caller.

    `spool_dir`: where the outbox lives (``OUT/tracking`` for a run); None: a private temporary folder,
    removed at `close` (nothing to replay later). `work`: what goes on when tracking fails (its warning)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        spool_dir: str | Path | None = None,
        flush_timeout_s: float = TrackingConfig.flush_timeout_s,
        max_backoff_s: float = 30.0,
        work: str = "training",
    ) -> None:
        self.tracking_uri = tracking_uri
        self.work = work  # what goes on when tracking fails, as its warning says
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
        self._sampler: SystemSampler | None = None
        self.flush_s = 0.0  # how long `close` waited for the sender

        bound_http_env()
        next_system_step = self.outbox.next_system_step()
        try:
            self._client = open_client(tracking_uri)
            self._run_id, run = open_run(self._client, tracking_uri, experiment, run_name, run_id)
            self.outbox.append({"op": "opened", "run": self._run_id})
            if run is not None:
                next_system_step = self._take_up(run, next_system_step)
        except Exception as err:  # the store is down or refuses: `_wait_for_store` decides
            start = {"op": "start", "experiment": experiment, "name": run_name, "resume": run_id}
            if not self._wait_for_store(err, start):
                return
        self._sender = Sender(self.outbox, self._client, self.shown_uri, self._failed, max_backoff_s)
        self._sender.start()
        if system_metrics:
            self._sampler = SystemSampler(self, system_metrics_interval_s, next_system_step)

    def _take_up(self, run: Any, next_system_step: int) -> int:
        """Continue a resumed `run`: its logged params and changed-param tags are known; returns the first
        system-metrics step (a resumed run continues its system/ steps, not from 0)."""
        self._params = dict(run.data.params)
        self._changed = {k.removeprefix(CHANGED_TAG) for k in run.data.tags if k.startswith(CHANGED_TAG)}
        if next_system_step == 0:
            next_system_step = 1 + max(
                (m.step for m in run.data._metric_objs if m.key.startswith(SYSTEM_PREFIX)), default=-1
            )
        return next_system_step

    def _wait_for_store(self, err: Exception, start: dict[str, Any]) -> bool:
        """The run could not be opened. The store unreachable: the `start` record goes to the outbox, for
        the sender to open the run when the store answers (True). The store refused, or no client could be
        made: tracking is off for this run (False)."""
        if self._client is None or is_refusal(err):
            self._client = None
            self._failed("start the run", err, stacklevel=4)
            self._closed = True
            self.outbox.close()
            if self._temporary:
                shutil.rmtree(self.outbox.folder, ignore_errors=True)
            return False
        self._failed("start the run", err, stacklevel=4)
        self.outbox.append({**start, "t": _now_ms()})
        return True

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
        it is now is what gets sent (it is linked or copied into the outbox)."""
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
            f"-- {self.work} goes on; {then}",
            TrackingWarning,
            stacklevel=stacklevel,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
