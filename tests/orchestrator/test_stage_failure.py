"""A stage that raises ends its own MLflow run FAILED with the reason (not left RUNNING beside a FAILED
pipeline run); on a real local MLflow store, no Ray (the stage is replaced by one that opens its run and fails)."""
import pytest

from orchestrator import pipeline
from orchestrator.config import load


def _local(tmp_path, monkeypatch):
    """The smoke config on a local folder and a local MLflow store, whatever services the environment names."""
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return load(["experiment=smoke", "storage=fs", "tracking=file", f"storage.root={tmp_path}/store",
                 f"tracking.root={tmp_path}/mlflow"])


def test_a_failing_stage_ends_its_run_failed_with_the_reason(tmp_path, monkeypatch):
    pc, opened = _local(tmp_path, monkeypatch), {}

    def teacher_that_fails(ctx):
        opened["id"] = ctx.open_run("teacher")
        raise RuntimeError("out of disk on the node")

    monkeypatch.setattr(pipeline, "stage_teacher", teacher_that_fails)
    ctx = pipeline.context(pc, pc.to_dict(), progress=False)
    with pytest.raises(RuntimeError, match="out of disk"):
        pipeline.run_stages(pc, pc.to_dict(), "evaluate", progress=False, ctx=ctx)
    run = ctx.tracker.run_data(opened["id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["hkd.end_reason"] == "RuntimeError: out of disk on the node"
    ctx.fail("teacher", RuntimeError("again"))                  # an ended run is not touched twice
    assert ctx.tracker.run_data(opened["id"]).data.tags["hkd.end_reason"].endswith("out of disk on the node")


def test_a_run_ended_by_something_else_still_gets_the_reason_with_the_path(tmp_path, monkeypatch):
    """The issue-25 failure: MLflow's log_model raised FileNotFoundError from Path.cwd() (no path in the message)
    and the distill run was left FAILED without hkd.end_reason. Whatever ended the run first, the reason lands,
    and an OSError names its path."""
    pc, opened = _local(tmp_path, monkeypatch), {}

    def teacher_that_fails(ctx):
        opened["id"] = ctx.open_run("teacher")
        ctx.tracker.end(opened["id"], "FAILED")                 # as an inner context manager would
        raise FileNotFoundError(2, "No such file or directory", "/tmp/ray/_ray_pkg_x/pyproject.toml")

    monkeypatch.setattr(pipeline, "stage_teacher", teacher_that_fails)
    ctx = pipeline.context(pc, pc.to_dict(), progress=False)
    with pytest.raises(FileNotFoundError):
        pipeline.run_stages(pc, pc.to_dict(), "evaluate", progress=False, ctx=ctx)
    run = ctx.tracker.run_data(opened["id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["hkd.end_reason"] == ("FileNotFoundError: No such file or directory: "
                                               "/tmp/ray/_ray_pkg_x/pyproject.toml")
