"""The outbox's sender: a thread that delivers a run's tracking records to its MLflow store, in order and
batched, retrying while the store is down; the engine of the logger and of `autosam2 sync` alike.

Delivery is at least once; it is exactly once in the run because MLflow's stores keep one row per
identical (key, value, timestamp, step) metric, params are only logged once, and an artifact's upload
overwrites the same path. A record the store refuses (a bad name) is stepped over; MLflow's HTTP retries
and timeouts are bounded (`mlflow_store.HTTP_ENV_DEFAULTS`), so a hung server holds the sender for
seconds rather than MLflow's ~4 minutes per call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from autosam2.tracking.mlflow_store import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    is_refusal,
    open_run,
)
from autosam2.tracking.outbox import Outbox

_log = logging.getLogger(__name__)

THREAD_NAME = "mlflow-sender"


class _QuietRetries(logging.Filter):
    """urllib3 logs a warning for each retry of a request; the sender's probes of a store that is down
    would fill a job's log with them (the first failure is warned about once, by the logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            threading.current_thread().name == THREAD_NAME and record.getMessage().startswith("Retrying")
        )


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


class Sender(threading.Thread):
    """Delivers the outbox's records in order: consecutive ones of a kind in one MLflow batch; a store
    that does not answer is retried with backoff (0.5 s doubling up to `max_backoff_s`); a record it
    refuses (a bad value) is stepped over with a warning. Also `autosam2 sync`'s engine."""

    def __init__(
        self,
        outbox: Outbox,
        client: Any,
        shown_uri: str,
        on_failure: Callable[[str, BaseException], None],
        max_backoff_s: float = 30.0,
    ):
        super().__init__(name=THREAD_NAME, daemon=True)
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
                if is_refusal(err) and count > 1:  # which record? each alone, so only that one is lost
                    one_by_one = count
                    continue
                self.on_failure(what, err)
                if is_refusal(err):  # the store answered no: this record will never go
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
