"""`hkd teacher ... teacher.resume_from=<checkpoint>` through the real driver and Ray Train (in this process, fs
storage, a local MLflow store): a teacher trained to 0.064 kimg is continued to 0.128 kimg from its own training
checkpoint; the run says where it came from (tags, train/resumed_from_kimg) and ends at the new total."""

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load

pytestmark = pytest.mark.slow  # two short teacher trainings on Ray Train in this process: about a minute

TINY_TEACHER = [
    "experiment=smoke",
    "teacher=edm",
    "data.limit=64",
    "teacher.channels=8",
    "teacher.channel_mult=[1,2]",
    "teacher.blocks=1",
    "teacher.attn_resolutions=[]",
    "teacher.batch_size=16",
    "teacher.lr_rampup_kimg=0.064",
    "teacher.log_every_kimg=0.032",
    "teacher.checkpoint_every_kimg=0.032",
    "storage=fs",
    "tracking=file",
    "cluster.address=null",
    "cluster.num_workers=1",
]


def test_a_teacher_continues_from_its_training_checkpoint(tmp_path):
    import mlflow
    import ray

    base = TINY_TEACHER + [f"storage.root={tmp_path}/store", f"tracking.root={tmp_path}/mlflow"]
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):  # no service, even if one runs
            mp.delenv(var, raising=False)
        if ray.is_initialized():
            ray.shutdown()
        try:
            first = tmp_path / "first.json"
            assert (
                main(["teacher", *base, "teacher.total_kimg=0.064", "--no-progress", "--json", str(first)])
                == 0
            )
            ckpts = sorted((tmp_path / "store").rglob("ckpt-*.pt"))
            assert ckpts, "the first run recorded no training checkpoint"
            given = str(ckpts[-1])
            more = base + ["teacher.total_kimg=0.128", f"teacher.resume_from={given}"]
            again = tmp_path / "again.json"
            assert main(["teacher", *more, "--no-progress", "--json", str(again)]) == 0
        finally:
            ray.shutdown()
    result = json.loads(again.read_text())["teacher"]
    assert result["kimg"] == pytest.approx(0.128) and result["resumed_from"] == given
    assert json.loads(first.read_text())["teacher"]["kimg"] == pytest.approx(0.064)
    pc = load(more)
    assert pc.stages()["teacher"] != load(base + ["teacher.total_kimg=0.128"]).stages()["teacher"]
    client = mlflow.tracking.MlflowClient(pc.tracking.resolved_uri())
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`hkd.teacher_source` = 'resumed'"
    )
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["hkd.resumed_from"] == given and float(tags["hkd.resumed_from_kimg"]) == pytest.approx(0.064)
    resumed = client.get_metric_history(runs[0].info.run_id, "train/resumed_from_kimg")
    assert [m.value for m in resumed] == [pytest.approx(0.064)]


def test_a_given_checkpoint_is_written_under_the_name_its_kimg_is_read_from(tmp_path):
    from orchestrator.stages.reporting import given_checkpoint

    path = given_checkpoint(tmp_path, b"bytes", 1234.5)
    assert Path(path).read_bytes() == b"bytes" and Path(path).parent != tmp_path  # apart from the loop's own
    assert float(Path(path).stem.split("-", 1)[1]) == 1234.5  # as count_attempt reads it
