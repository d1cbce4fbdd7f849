"""A sweep's concurrency on an autoscaling cluster (issue 25): sized from the cluster at its largest
(cluster.max_cpus / max_gpus), so that the trials beyond what is up now wait as pending demand and the autoscaler
adds nodes for them; from what is up now only on a fixed cluster. Without Ray: the sizes are arithmetic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ClusterConfig
from orchestrator.sweep.run import concurrency
from orchestrator.sweep.spec import Resources, SweepSpec

ROOT = Path(__file__).resolve().parents[2]


def _spec(**kw) -> SweepSpec:
    return SweepSpec(
        name="t",
        base=[],
        space={},
        trials=kw.pop("trials", 16),
        resources=Resources(**kw) if kw else Resources(),
    )


def test_concurrency_comes_from_the_cluster_at_its_largest_not_from_what_is_up():
    # 8 GPU workers of 4 CPUs per trial (+1 CPU for the trial): 160 CPUs hold 4, 32 GPUs hold 4
    spec = _spec(workers=8, cpus_per_worker=4, gpus_per_worker=1)
    n, source = concurrency(spec, ClusterConfig(max_cpus=160, max_gpus=32))
    assert n == 4 and "at its largest" in source and "max_gpus=32" in source
    # the scarcer resource decides; never more than the trials, never fewer than one
    assert concurrency(spec, ClusterConfig(max_cpus=160, max_gpus=8))[0] == 1
    assert concurrency(_spec(workers=1, trials=3), ClusterConfig(max_cpus=64))[0] == 3
    assert concurrency(_spec(workers=2), ClusterConfig(max_cpus=2))[0] == 1
    # max_concurrency in the sweep file wins
    capped = SweepSpec(name="t", base=[], space={}, trials=16, max_concurrency=2)
    assert concurrency(capped, ClusterConfig(max_cpus=160)) == (2, "max_concurrency")


def test_the_gpu_cluster_config_states_the_kuberay_manifests_largest_size():
    """conf/cluster/gpu.yaml's max_cpus / max_gpus are infra/kuberay/raycluster.yaml's GPU group at maxReplicas
    (the documented value): a changed manifest that leaves them behind fails here."""
    gpu = yaml.safe_load((ROOT / "orchestrator/conf/cluster/gpu.yaml").read_text())
    rc = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text().replace("${HKD_IMAGE}", "img"))
    group = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["max_gpus"] == group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert gpu["max_cpus"] == group["maxReplicas"] * int(limits["cpu"])
    assert group["minReplicas"] == 0 and rc["spec"]["enableInTreeAutoscaling"] is True


def test_tunes_snapshot_period_grows_with_the_trials_and_a_users_own_stays(monkeypatch):
    """A snapshot of Tune's experiment state costs in proportion to the trials, so a fixed 1 s period took 13 % of
    a 256-trial sweep's driver (issue 28): the period grows with the trials, never under 1 s, and is set again
    for each sweep in the process; a TUNE_GLOBAL_CHECKPOINT_S the user set is left alone."""
    from orchestrator.sweep import snapshots as run

    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    monkeypatch.setattr(run, "_period_set", None)
    assert run.snapshot_period_s(4) == 1.0 and run.snapshot_period_s(64) == 1.0
    assert run.snapshot_period_s(256) == pytest.approx(3.84)
    assert run.snapshot_period_s(1024) > 4 * run.snapshot_period_s(256) * 0.99
    assert run.set_snapshot_period(4) == "1"
    assert run.set_snapshot_period(256) == "3.84"  # a second sweep in the same driver: its own period
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "3.84"
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "auto")  # the user's choice
    assert run.set_snapshot_period(256) == "auto" and run.set_snapshot_period(4) == "auto"
