"""MLflow's system metrics on a run shorter than one sampling interval (a short distill's rank 0)."""

from __future__ import annotations

import pytest

pytest.importorskip("psutil")

from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.services.system_metrics import SystemMetrics  # noqa: E402
from orchestrator.services.tracking import TrackingConfig  # noqa: E402


def test_a_run_shorter_than_the_interval_still_gets_its_point(tmp_path):
    cfg = TrackingConfig(kind="file", root=str(tmp_path), system_metrics_s=600.0)
    client = MlflowClient(cfg.resolved_uri())
    exp = client.create_experiment("sm", artifact_location=cfg.artifact_location())
    run = client.create_run(exp).info.run_id
    with SystemMetrics(cfg, run, node="train_rank0") as sm:
        assert sm.monitor is not None
    # MLflow's monitor alone publishes at the end of its first 600 s interval: nothing for this run
    points = client.get_metric_history(run, "system/train_rank0/cpu_utilization_percentage")
    assert len(points) == 1 and 0 <= points[0].value <= 100
    assert client.get_metric_history(run, "system/train_rank0/system_memory_usage_megabytes")[0].value > 0
