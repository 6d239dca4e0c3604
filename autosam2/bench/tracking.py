"""Tracking outages: a training loop's logging (the trainer's metric set every step, an artifact every
few steps, system metrics every second) against a real `mlflow server` that is up, then hung (SIGSTOP:
it takes connections and never answers), up again, then dead (killed), then back (restarted on the same
port). The figures: the longest time one step spent in logging calls in each phase (the stall the loop
sees), how long after the server came back every record had arrived, how long `close` waited, and
whether the run holds every step and artifact exactly once."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autosam2.arguments import positive_float, positive_int
from autosam2.bench.mlflow_server import kill_group, start_mlflow_server
from autosam2.engine.trainer import TRAIN_METRICS
from autosam2.tracking import MLflowLogger

# the server's state in each phase, in order: SIGSTOP hangs it (it takes connections and never answers)
PHASES = ("up", "hung", "up_again", "dead", "back")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase-s", type=positive_float, default=10.0, help="how long each phase lasts")
    p.add_argument("--step-s", type=positive_float, default=0.05, help="the simulated training step")
    p.add_argument("--artifact-every", type=positive_int, default=20, help="steps between artifacts")
    p.add_argument(
        "--max-backoff-s", type=positive_float, default=30.0, help="the sender's retry cap (the default)"
    )


@dataclass
class _Loop:
    """The simulated training loop: steps and artifacts logged, each phase's stalls, and the catching up
    after the server's return."""

    step: int = 0
    artifacts: int = 0
    stalls: dict[str, dict[str, float]] = field(default_factory=dict)
    back_at: float | None = None
    caught_up_s: float | None = None
    backlog: int = 0  # outbox bytes queued when the server came back


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="autosam2-bench-") as tmp:
        store = Path(tmp) / "server"
        uri, proc = start_mlflow_server(store)
        port = int(uri.rsplit(":", 1)[1])
        logger = MLflowLogger(
            uri,
            "bench",
            "tracking",
            system_metrics=True,
            system_metrics_interval_s=1.0,
            spool_dir=Path(tmp) / "run" / "tracking",
            flush_timeout_s=120.0,
            max_backoff_s=args.max_backoff_s,
        )
        run_id = logger.run_id
        logger.log_params({"bench": {"phase_s": args.phase_s, "step_s": args.step_s}})
        loop = _Loop()
        try:
            for phase in PHASES:
                uri, proc = _enter(phase, uri, proc, store, port, logger, loop)
                loop.stalls[phase] = _log_for_a_phase(args, logger, Path(tmp) / "valid.json", loop)
            outbox_bytes = logger.outbox.path.stat().st_size
            logger.close()
            delivered = _read_back(uri, run_id)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            kill_group(proc)
    return _report(args, loop, logger, outbox_bytes, *delivered)


def _enter(phase: str, uri: str, proc: Any, store: Path, port: int, logger: MLflowLogger, loop: _Loop):
    """Put the server in `phase`'s state; returns its (uri, process), a new one when it is restarted."""
    if phase == "hung":
        os.killpg(proc.pid, signal.SIGSTOP)
    elif phase == "up_again":
        os.killpg(proc.pid, signal.SIGCONT)
    elif phase == "dead":
        kill_group(proc)
    elif phase == "back":
        uri, proc = start_mlflow_server(store, port=port)
        loop.back_at = time.monotonic()
        loop.backlog = logger.outbox.path.stat().st_size  # what the outage left queued
    return uri, proc


def _log_for_a_phase(
    args: argparse.Namespace, logger: MLflowLogger, artifact: Path, loop: _Loop
) -> dict[str, float]:
    """Simulated steps for --phase-s, each logging the trainer's metrics (an artifact every
    --artifact-every steps); returns the longest and the median time a step spent in logging calls."""
    times = []
    end = time.monotonic() + args.phase_s
    while time.monotonic() < end:
        start = time.perf_counter()
        logger.log_metrics({key: 1.0 / (loop.step + 1) for key in TRAIN_METRICS}, loop.step)
        if loop.step % args.artifact_every == 0:
            artifact.write_text(f'{{"step": {loop.step}}}')
            logger.log_artifact(artifact, f"valid/step_{loop.step:06d}")
            loop.artifacts += 1
        times.append(time.perf_counter() - start)
        if (
            loop.back_at is not None
            and loop.caught_up_s is None
            and logger.outbox.state["sent"] >= loop.backlog
        ):
            loop.caught_up_s = time.monotonic() - loop.back_at
        loop.step += 1
        time.sleep(args.step_s)
    return {"longest_s": round(max(times), 4), "median_s": round(statistics.median(times), 6)}


def _read_back(uri: str, run_id: str | None) -> tuple[list[int], list[Any], list[str]]:
    """What the run holds: the steps of train/loss_total, the system-metric samples, the artifacts."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    history = [m.step for m in client.get_metric_history(run_id, "train/loss_total")]
    system = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    logged = [a.path for a in client.list_artifacts(run_id, "valid")]
    return history, system, logged


def _report(
    args: argparse.Namespace,
    loop: _Loop,
    logger: MLflowLogger,
    outbox_bytes: int,
    history: list[int],
    system: list[Any],
    logged: list[str],
) -> dict[str, Any]:
    step, artifacts, stalls, caught_up_s = loop.step, loop.artifacts, loop.stalls, loop.caught_up_s
    complete = sorted(history) == list(range(step)) and len(logged) == artifacts
    worst = max(s["longest_s"] for s in stalls.values())
    return {
        "bench": "tracking",
        "step_stall_s": stalls,
        "longest_step_stall_s": worst,
        # None: the backlog was not through within the last phase (make --phase-s longer)
        "caught_up_after_return_s": None if caught_up_s is None else round(caught_up_s, 2),
        "close_flush_s": round(logger.flush_s, 3),
        "longest_outage_seen_by_sender_s": round(logger._sender.longest_outage_s, 2),
        "outbox_MB": round(outbox_bytes / 1e6, 3),
        "delivered": {
            "steps_logged": step,
            "steps_in_run": len(history),
            "distinct_steps_in_run": len(set(history)),
            "artifacts_logged": artifacts,
            "artifacts_in_run": len(logged),
            "system_metric_samples": len(system),
            "every_step_and_artifact_once": complete,
        },
        "target": {"longest_step_stall_s": 1.0, "met": worst <= 1.0},
        "config": {
            "phase_s": args.phase_s,
            "step_s": args.step_s,
            "metrics_per_step": len(TRAIN_METRICS),
            "artifact_every": args.artifact_every,
            "max_backoff_s": args.max_backoff_s,
        },
        "notes": "stall: the time one simulated step spent in logger calls (metrics every step, an artifact "
        "every --artifact-every steps); phases of --phase-s each: up, hung (SIGSTOP), up again (SIGCONT), "
        "dead (killed), back (restarted on the same port). caught_up_after_return_s: from the restarted "
        "server's first healthy answer until every record queued during the outages had been delivered (it "
        "includes the sender's backoff wait, up to --max-backoff-s); close_flush_s: how long close waited at "
        "the end, the server up",
    }
