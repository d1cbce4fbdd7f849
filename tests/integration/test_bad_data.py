"""Bad input data on the real stack: a corrupt trajectory shard is refused by the driver before Ray Train starts
(or skipped and counted where the config says so); a checkpoint of another architecture is refused before
training. Each case copies the smoke pipeline's trajectories under a prefix of its own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _keys(s3, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (not folder markers)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="hkd", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]


# ---- corrupt inputs: refused by the driver before Ray Train starts --------------------------------------


def _copy_trajectories(s3, first: dict, prefix: str) -> str:
    """The smoke pipeline's trajectories stage, copied under another storage prefix; returns the copy's
    train folder key."""
    src_root = first["_storage_root"].split("s3://hkd/", 1)[1]
    traj = (
        first["trajectories"]["train"]["uri"].split("s3://hkd/", 1)[1].rsplit("/", 1)[0]
    )  # .../trajectories-<h>
    for k in _keys(s3, traj + "/"):
        s3.copy_object(Bucket="hkd", Key=prefix + k[len(src_root) :], CopySource={"Bucket": "hkd", "Key": k})
    return prefix + traj[len(src_root) :] + "/train"


def _refused(argv: list[str], capsys) -> tuple[int, str, float]:
    from orchestrator.cli import main

    t0 = time.monotonic()
    rc = main(["distill", *argv, "--no-progress"])
    return rc, capsys.readouterr().err, time.monotonic() - t0


@pytest.mark.parametrize("case", ["truncated", "altered", "missing"])
def test_corrupt_shard_is_refused_before_training(
    first_pipeline, s3, smoke, run_tag, case, capsys, fault_report
):
    res, _ = first_pipeline
    prefix = f"itc-{run_tag}-{case}"
    train = _copy_trajectories(s3, res, prefix)
    key = f"{train}/shard-000001.npz"
    body = s3.get_object(Bucket="hkd", Key=key)["Body"].read()
    if case == "truncated":
        s3.put_object(Bucket="hkd", Key=key, Body=body[: len(body) // 2])
        expect = (
            f"s3://hkd/{key} has {len(body) // 2} bytes, the manifest says {len(body)}: truncated or altered"
        )
    elif case == "altered":  # same size, one byte changed: only a checksum tells
        s3.put_object(Bucket="hkd", Key=key, Body=body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:])
        expect = f"s3://hkd/{key} has MD5 "
    else:
        s3.delete_object(Bucket="hkd", Key=key)
        # A stage's done-marker lists the files it wrote, and a listed file that is gone makes the stage run
        # again (tests/orchestrator/test_stage_cache.py). The manifest is checked on its own, for a shard the
        # marker does not vouch for: a marker written before the list (as here), or a manifest edited by hand.
        done = key.rsplit("/train/", 1)[0] + "/_SUCCESS.json"
        marker = json.loads(s3.get_object(Bucket="hkd", Key=done)["Body"].read())
        marker.pop("_outputs", None)
        s3.put_object(Bucket="hkd", Key=done, Body=json.dumps(marker).encode())
        expect = f"manifest lists s3://hkd/{key}, which does not exist"
    rc, err, took = _refused([*smoke, f"storage.prefix={prefix}", f"name=corrupt-{case}-{run_tag}"], capsys)
    assert rc == 3 and f"hkd: input error: {expect}" in err, err[-2000:]
    assert not [k for k in _keys(s3, prefix + "/") if "/ray/distill-" in k]  # Ray Train never started
    fault_report.append(
        {"fault": f"{case} trajectory shard", "refused after (s)": took, "message": err.strip()[:160]}
    )


def test_corrupt_shard_skipped_and_counted_when_configured(first_pipeline, s3, smoke, run_tag, fault_report):
    from orchestrator.cli import main

    res, _ = first_pipeline
    prefix = f"itc-{run_tag}-skip"
    train = _copy_trajectories(s3, res, prefix)
    key = f"{train}/shard-000002.npz"
    body = s3.get_object(Bucket="hkd", Key=key)["Body"].read()
    s3.put_object(Bucket="hkd", Key=key, Body=body[:-10])
    out = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).parent / f"skip-{run_tag}.json"
    assert (
        main(
            [
                "distill",
                *smoke,
                f"storage.prefix={prefix}",
                "train.skip_corrupt_shards=true",
                "train.total_kimg=0.128",
                f"name=skip-{run_tag}",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["distill"]["kimg"] == pytest.approx(0.128)
    c = _client()
    run = [
        x
        for x in c.search_runs(
            [c.get_experiment_by_name(f"it-{run_tag}").experiment_id], "tags.`hkd.stage` = 'distill'"
        )
        if x.data.tags["hkd.run_key"].startswith(f"skip-{run_tag}/")
    ]
    assert len(run) == 1 and run[0].data.metrics["data/skipped_shards"] == 1
    assert run[0].data.tags["hkd.skipped_shards"] == "shard-000002.npz"
    fault_report.append(
        {
            "fault": "truncated shard with train.skip_corrupt_shards=true",
            "result": "trained on the other 3 shards; data/skipped_shards = 1",
        }
    )


def test_checkpoint_of_another_architecture_is_refused_before_training(
    first_pipeline, s3, smoke, run_tag, capsys, fault_report
):
    """A checkpoint Ray would resume from that was written for another model (a code change under the same
    config): named, with what differs, before any worker starts."""
    from orchestrator.config import load

    res, _ = first_pipeline
    other = [*smoke, "model.subspace_dims=[8,8]", f"name=arch-{run_tag}"]  # the tiny preset has [4,4]
    src = res["distill"]["ray_path"].split("hkd/", 1)[1].rstrip("/") + "/"
    dst = f"it-{run_tag}/ray/distill-{load(other).stages()['distill']}/"
    assert src != dst
    for k in _keys(s3, src):
        s3.copy_object(Bucket="hkd", Key=dst + k[len(src) :], CopySource={"Bucket": "hkd", "Key": k})
    rc, err, took = _refused(other, capsys)
    assert rc == 3, err[-2000:]
    assert f"hkd: input error: checkpoint s3://hkd/{dst}checkpoint_" in err
    assert "was written for a different architecture" in err and "shape" in err
    fault_report.append(
        {
            "fault": "resume checkpoint of another architecture",
            "refused after (s)": took,
            "message": err.strip()[:160],
        }
    )
