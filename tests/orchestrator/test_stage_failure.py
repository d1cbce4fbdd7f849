"""A stage that raises ends its own MLflow run FAILED with the reason (not left RUNNING beside a FAILED
pipeline run); on a real local MLflow store, no Ray (the stage is replaced by one that opens its run and fails)."""

import pytest

from orchestrator.config import load
from orchestrator.stages import driver as pipeline


def _local(tmp_path, monkeypatch):
    """The smoke config on a local folder and a local MLflow store, whatever services the environment names."""
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return load(
        [
            "experiment=smoke",
            "storage=fs",
            "tracking=file",
            f"storage.root={tmp_path}/store",
            f"tracking.root={tmp_path}/mlflow",
        ]
    )


@pytest.mark.slow
def test_a_failing_stage_ends_its_run_failed_with_the_reason(tmp_path, monkeypatch):
    pc, opened = _local(tmp_path, monkeypatch), {}

    def teacher_that_fails(ctx):
        opened["id"] = ctx.open_run("teacher")
        raise RuntimeError("out of disk on the node")

    monkeypatch.setattr(pipeline, "stage_teacher", teacher_that_fails)
    ctx = pipeline.context(pc, progress=False)
    with pytest.raises(RuntimeError, match="out of disk"):
        pipeline.run_stages(pc, "evaluate", progress=False, ctx=ctx)
    run = ctx.tracker.run_data(opened["id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["hkd.end_reason"] == "RuntimeError: out of disk on the node"
    ctx.fail("teacher", RuntimeError("again"))  # an ended run is not touched twice
    assert ctx.tracker.run_data(opened["id"]).data.tags["hkd.end_reason"].endswith("out of disk on the node")


def test_a_run_ended_by_something_else_still_gets_the_reason_with_the_path(tmp_path, monkeypatch):
    """The issue-25 failure: MLflow's log_model raised FileNotFoundError from Path.cwd() (no path in the message)
    and the distill run was left FAILED without hkd.end_reason. Whatever ended the run first, the reason lands,
    and an OSError names its path."""
    pc, opened = _local(tmp_path, monkeypatch), {}

    def teacher_that_fails(ctx):
        opened["id"] = ctx.open_run("teacher")
        ctx.tracker.end(opened["id"], "FAILED")  # as an inner context manager would
        raise FileNotFoundError(2, "No such file or directory", "/tmp/ray/_ray_pkg_x/pyproject.toml")

    monkeypatch.setattr(pipeline, "stage_teacher", teacher_that_fails)
    ctx = pipeline.context(pc, progress=False)
    with pytest.raises(FileNotFoundError):
        pipeline.run_stages(pc, "evaluate", progress=False, ctx=ctx)
    run = ctx.tracker.run_data(opened["id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["hkd.end_reason"] == (
        "FileNotFoundError: No such file or directory: /tmp/ray/_ray_pkg_x/pyproject.toml"
    )


@pytest.mark.slow
def test_a_nan_loss_ends_the_distill_run_failed_naming_the_step(tmp_path, monkeypatch, capsys):
    """A learning rate that blows the weights up: training stops at the first NaN step (hkd_core.loop), `hkd`
    prints one line naming the step and exits 1, and the distill run is FAILED with that sentence as its
    reason, on a real Ray Train run in this process."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    pc = _local(tmp_path, monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    over = [
        "experiment=smoke",
        "storage=fs",
        "tracking=file",
        f"storage.root={tmp_path}/store",
        f"tracking.root={tmp_path}/mlflow",
        "cluster.address=null",
        "train.lr=1e30",
        "train.total_kimg=0.256",
        "cluster.max_failures=0",
    ]  # a NaN comes back on every retry: fail at once
    try:
        assert main(["distill", *over, "--no-progress"]) == 1
    finally:
        ray.shutdown()
    last = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hkd: ")][-1]
    assert last.startswith("hkd: distill failed: hkd_core.loop.NonFiniteLossError: distill: the loss is nan")
    assert "at step" in last and "train.skip_nonfinite=true" in last
    client = MlflowClient(pc.tracking.resolved_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    distill = [r for r in runs if r.data.tags.get("hkd.stage") == "distill"]
    assert len(distill) == 1 and distill[0].info.status == "FAILED"
    reason = distill[0].data.tags["hkd.end_reason"]
    assert (
        reason.startswith("hkd_core.loop.NonFiniteLossError: distill: the loss is nan")
        and "at step" in reason
    )
