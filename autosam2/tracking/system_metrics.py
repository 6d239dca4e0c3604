"""System metrics of a tracked run (``system/cpu_utilization_percentage``, memory, disk, network; GPU when
`pynvml` from `nvidia-ml-py` sees one), sampled by MLflow's own monitors on a thread of ours."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Protocol

from autosam2.tracking.outbox import SYSTEM_PREFIX


class _Metrics(Protocol):
    """Where the samples go: the run's logger."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...


_log = logging.getLogger(__name__)


class SystemSampler(threading.Thread):
    """System metrics (``system/cpu_utilization_percentage``, memory, disk, network; GPU when MLflow's
    GPU monitor finds one) sampled by MLflow's own monitors every `interval_s` and logged through the
    outbox like any metric, so an outage loses none and the sampling never stops for one.
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, when exported, overrides the interval (as in MLflow)."""

    def __init__(self, logger: _Metrics, interval_s: float, first_step: int):
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
            self.logger.log_metrics({f"{SYSTEM_PREFIX}{k}": v for k, v in metrics.items()}, self.step)
            self.step += 1

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()
