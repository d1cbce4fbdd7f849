"""MLflow's system metrics on the runs whose work this process does (issue 25)."""

from __future__ import annotations

import logging

from orchestrator.services.tracking import TrackingConfig
from orchestrator.services.tracking_auth import use_credentials_file

log = logging.getLogger(__name__)


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through nvidia-ml-py where a
    driver is present) sampled every ``cfg.system_metrics_s`` seconds onto a run that this process does the work
    of: the driver's stage runs (``system/...``) and, in training, rank 0 (``system/<node>/...``). Needs psutil
    (the cluster extra); without it, or with ``tracking.system_metrics_s=0``, nothing. Never fails the work."""

    _warned = False

    def __init__(self, cfg: TrackingConfig, run_id: str | None, node: str | None = None):
        self.monitor = None
        if not run_id or cfg.system_metrics_s <= 0:
            return
        try:
            import psutil  # noqa: F401 - MLflow's CPU monitor needs it
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            if not SystemMetrics._warned:
                log.info("system metrics off: psutil is not installed (pip install 'hkd[cluster]')")
                SystemMetrics._warned = True
            return
        try:
            use_credentials_file()
            self.monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=cfg.system_metrics_s,
                samples_before_logging=1,
                resume_logging=True,
                node_id=node,
                tracking_uri=cfg.resolved_uri(),
            )
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 - metrics about the machine never stop the work
            log.warning("system metrics not started on run %s: %s", run_id, str(e)[:200])
            self.monitor = None

    def finish(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("system metrics: %s", str(e)[:200])
            self.monitor = None

    def __enter__(self) -> SystemMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
