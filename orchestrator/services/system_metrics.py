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
    (the cluster extra); without it, or with ``tracking.system_metrics_s=0``, nothing. Never fails the work.

    A run shorter than one interval still gets one point: MLflow's monitor publishes only at the end of an
    interval, so ``finish`` publishes what it sampled (or one fresh sample) when nothing was published yet."""

    _warned = False

    def __init__(self, cfg: TrackingConfig, run_id: str | None, node: str | None = None):
        self.monitor = None
        self._first_step = 0
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
            self._first_step = self.monitor._logging_step  # resume_logging: after the run's existing points
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 - metrics about the machine never stop the work
            log.warning("system metrics not started on run %s: %s", run_id, str(e)[:200])
            self.monitor = None

    def finish(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()  # stops the sampling thread and flushes what it published
                if self.monitor._logging_step == self._first_step:
                    self._publish_last()
            except Exception as e:  # noqa: BLE001
                log.warning("system metrics: %s", str(e)[:200])
            self.monitor = None

    def _publish_last(self) -> None:
        """The sample the monitor took at its start (or a fresh one), as one point, sent now."""
        m = self.monitor
        metrics = m.aggregate_metrics()
        if not metrics:
            m.collect_metrics()
            metrics = m.aggregate_metrics()
        if metrics:
            m.publish_metrics(metrics)
            m.mlflow_logger.flush()

    def __enter__(self) -> SystemMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
