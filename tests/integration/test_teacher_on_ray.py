"""The EDM teacher on the real stack: Ray Train fits it, its EMA weights go to S3 and feed the trajectory tasks,
and it is continued from its own training checkpoint in S3 (teacher.resume_from)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _runs(experiment: str):
    c = _client()
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], "", max_results=200) if exp else []


def test_edm_teacher_trains_on_ray_and_feeds_the_trajectory_tasks(local_stack, s3, smoke, run_tag):
    """teacher=edm: Ray Train fits the U-Net, its EMA weights go to S3, and the sampling tasks load them; then the
    teacher is continued from its own training checkpoint in S3 (teacher.resume_from)."""
    args = [
        *smoke,
        "teacher=edm",
        "teacher.channels=8",
        "teacher.channel_mult=[1,2]",
        "teacher.blocks=1",
        "teacher.attn_resolutions=[]",
        "teacher.total_kimg=0.256",
        "teacher.batch_size=32",
        "teacher.log_every_kimg=0.064",
        "teacher.checkpoint_every_kimg=0.128",
        f"name=edm-{run_tag}",
        "trajectories.num=64",
        "trajectories.holdout=8",
    ]
    out = os.path.join(os.path.dirname(os.environ["AWS_SHARED_CREDENTIALS_FILE"]), f"edm-{run_tag}.json")
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "trajectories", *args, "--no-progress", "--json", out],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(open(out).read())
    teacher = res["teacher"]
    assert teacher["kind"] == "edm" and teacher["kimg"] == pytest.approx(0.256)
    assert teacher["checkpoint_uri"].startswith(f"s3://hkd/it-{run_tag}/teacher-") and teacher[
        "checkpoint_uri"
    ].endswith("/teacher.pt")
    assert res["trajectories"]["teacher_uri"] == teacher["checkpoint_uri"]
    runs = [
        x
        for x in _runs(f"it-{run_tag}")
        if x.data.tags.get("hkd.run_key", "").startswith(f"edm-{run_tag}/teacher-")
    ]
    assert len(runs) == 1 and len(_client().get_metric_history(runs[0].info.run_id, "train/loss")) >= 2
    # the trajectories came from that U-Net: their manifest names it
    from hkd_core.trajectories import read_manifest
    from orchestrator.services.storage import S3Store, StorageConfig

    prefix = res["trajectories"]["train"]["uri"].split("s3://hkd/", 1)[1]
    m = read_manifest(S3Store(StorageConfig(prefix=""), prefix))
    assert m.teacher == {"kind": "edm", "uri": teacher["checkpoint_uri"]} and m.num_trajectories == 64

    # teacher.resume_from: the same teacher continued from its own training checkpoint in S3, to 0.384 kimg
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="hkd", Prefix=f"it-{run_tag}/")
    ckpts = sorted(
        o["Key"]
        for page in pages
        for o in page.get("Contents", [])
        if "/teacher-" in o["Key"] and o["Key"].rsplit("/", 1)[-1].startswith("ckpt-")
    )
    assert ckpts, "the teacher's training checkpoints are not in S3"
    given = f"s3://hkd/{ckpts[-1]}"
    more = [*args, "teacher.total_kimg=0.384", f"teacher.resume_from={given}"]
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "teacher", *more, "--no-progress", "--json", out],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(open(out).read())["teacher"]
    assert resumed["kimg"] == pytest.approx(0.384) and resumed["resumed_from"] == given
    assert resumed["checkpoint_uri"] != teacher["checkpoint_uri"]  # a stage of its own: the first one stays
    # the seconds of training count both segments: more than the first's, which the second carried on from
    assert teacher["train_s"] > 0 and resumed["train_s"] > teacher["train_s"]
    run = [x for x in _runs(f"it-{run_tag}") if x.data.tags.get("hkd.teacher_source") == "resumed"]
    assert len(run) == 1 and run[0].data.tags["hkd.resumed_from"] == given
    at = float(run[0].data.tags["hkd.resumed_from_kimg"])
    assert at == pytest.approx(0.256)  # the last checkpoint of the first run
    history = _client().get_metric_history(run[0].info.run_id, "train/resumed_from_kimg")
    assert [h.value for h in history] == [pytest.approx(at)]
    steps = [h.step for h in _client().get_metric_history(run[0].info.run_id, "train/loss")]
    assert steps and min(steps) > 256  # it trained on from the checkpoint, not from the start
