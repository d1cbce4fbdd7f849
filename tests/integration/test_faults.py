"""Faults injected into the real stack while distillation runs (bad input data: test_bad_data.py).

Each fault test starts ``hkd distill`` as its own process on the session's stack (Ray head, SeaweedFS,
MLflow), injects one fault once training is under way, and checks what the run kept: it completes, with
the same kimg as an uninterrupted run, in one MLflow run, with no checkpoint in S3 partial or dropped.
Recovery times go to the fault report printed at the end of the session (conftest.fault_report).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TOTAL = 0.768  # kimg: 24 steps of 32 images, about 8 s of training here: long enough that a fault injected
# at the first checkpoint or progress line lands while the run trains
# each fault test distils with its own train.seed: its own stage hash, so nothing is shared or skipped
FAULT_TRAIN = [f"train.total_kimg={TOTAL}", "train.checkpoint_every_kimg=0.064", "train.log_every_kimg=0.032"]


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _keys(s3, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (not folder markers)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="hkd", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]


class Distill:
    """``hkd distill`` in its own process group, its output in a file the test can read while it runs."""

    def __init__(self, args: list[str], tmp: Path, env: dict | None = None):
        from orchestrator.config import load

        self.args = args
        pc = load(args)
        self.hash = pc.stages()["distill"]
        self.ray_prefix = f"{pc.storage.prefix}/ray/distill-{self.hash}/"
        self.log = tmp / f"distill-{self.hash}.log"
        self.json = tmp / f"distill-{self.hash}.json"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "distill",
                *args,
                "--no-progress",
                "--json",
                str(self.json),
            ],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pred, what: str, timeout_s: float = 300):
        while not pred():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() - self.t0 < timeout_s, f"no {what} within {timeout_s} s"
            time.sleep(0.25)

    def finish(self, timeout_s: float = 600) -> dict:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        assert rc == 0, self.output()[-4000:]
        return json.loads(self.json.read_text())

    def recorded(self, s3) -> list[str]:
        """Checkpoints Ray Train's snapshot lists (what a restart can resume from)."""
        snap = f"{self.ray_prefix}checkpoint_manager_snapshot.json"
        if snap not in _keys(s3, self.ray_prefix):
            return []
        state = json.loads(s3.get_object(Bucket="hkd", Key=snap)["Body"].read())
        return [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]

    def run(self, run_tag: str):
        c = _client()
        exp = c.get_experiment_by_name(f"it-{run_tag}")
        runs = c.search_runs(
            [exp.experiment_id], f"tags.`hkd.stage_hash` = '{self.hash}' and tags.`hkd.stage` = 'distill'"
        )
        assert len(runs) == 1, f"{len(runs)} MLflow runs for one distillation"
        return runs[0]


def _history(run_id: str, key: str):
    return _client().get_metric_history(run_id, key)


def _assert_checkpoints_whole(s3, ray_prefix: str) -> int:
    """Every checkpoint folder in S3 holds exactly one checkpoint file, which loads, and whose content is the
    kimg its name says: none partial."""
    import torch

    folders: dict[str, list[str]] = {}
    for k in _keys(s3, ray_prefix):
        rest = k[len(ray_prefix) :]
        if rest.startswith("checkpoint_") and "/" in rest:
            folders.setdefault(rest.split("/", 1)[0], []).append(rest.split("/", 1)[1])
    assert folders, f"no checkpoint under s3://hkd/{ray_prefix}"
    for folder, files in folders.items():
        assert len(files) == 1 and files[0].startswith("ckpt-"), (folder, files)
        body = s3.get_object(Bucket="hkd", Key=f"{ray_prefix}{folder}/{files[0]}")["Body"].read()
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
        assert state["nimg"] / 1000 == pytest.approx(float(files[0][5:-3])), (folder, files[0], state["nimg"])
    return len(folders)


def _train_workers() -> list[int]:
    """PIDs of the live Ray Train workers of the test stack's Ray, from Ray's state API: never a process of
    another Ray that happens to run on the machine."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=os.environ["RAY_ADDRESS"],
        raise_on_missing_output=False,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return sorted(a.pid for a in actors)


def _assert_complete(res: dict, run, steps_per_log: int = 32) -> None:
    """The same kimg, steps and logging points as an uninterrupted run."""
    assert res["distill"]["kimg"] == pytest.approx(TOTAL) and res["distill"]["steps"] == round(
        TOTAL * 1000 / 32
    )
    assert run.info.status == "FINISHED"
    steps = {m.step for m in _history(run.info.run_id, "train/kimg")}
    assert steps == set(range(steps_per_log, round(TOTAL * 1000) + 1, steps_per_log))  # each logging point


def _assert_same_batches_as_uninterrupted(res: dict, run, seed: int, world: int, batch: int = 32) -> None:
    """Rank 0's batches, before the kill and after the resume, are those of an uninterrupted run: the logged
    data/seed_sum at every step (every value, the redone steps' included) equals the seed sum of that step's batch
    in the trajectory stream read straight through from the start."""
    from hkd_core.trajectories import TrajectoryDataset, read_manifest
    from orchestrator.services.storage import StorageConfig, store_at

    store = store_at(
        StorageConfig(endpoint_url=os.environ["AWS_ENDPOINT_URL"]),
        res["trajectories"]["train"]["uri"][len("s3://") :],
    )
    steps = round(TOTAL * 1000 / batch)
    per_rank = batch // world
    stream = iter(
        TrajectoryDataset(store, read_manifest(store), rank=0, world_size=world, seed=seed, epochs=None)
    )
    expected = {
        (k + 1) * batch: float(sum(next(stream)["seed"] for _ in range(per_rank))) for k in range(steps)
    }
    logged = _history(run.info.run_id, "data/seed_sum")
    assert {m.step for m in logged} == set(expected)
    wrong = [(m.step, m.value, expected[m.step]) for m in logged if m.value != expected[m.step]]
    assert not wrong, f"batches differ from the uninterrupted run's at (step, logged, expected): {wrong[:5]}"


def test_worker_killed_restarts_from_the_last_checkpoint_in_the_same_run(
    first_pipeline, s3, smoke, run_tag, tmp_path, fault_report
):
    """kill -9 of a Ray Train worker: FailureConfig restarts the worker group, which resumes from the last
    recorded checkpoint and ends at the same kimg, in one MLflow run that counts the attempts."""
    d = Distill([*smoke, *FAULT_TRAIN, "train.seed=11", f"name=wkill-{run_tag}"], tmp_path)
    d.wait_for(lambda: d.recorded(s3), "recorded checkpoint")
    pids = _train_workers()
    assert len(pids) == 2, pids  # cluster.num_workers=2
    os.kill(pids[0], signal.SIGKILL)
    t_kill = time.time()
    res = d.finish()
    run = d.run(run_tag)
    assert run.data.tags["hkd.train_attempts"] == "2" and run.data.tags["hkd.attempt"] == "1"
    resumed = _history(run.info.run_id, "train/resumed_from_kimg")
    assert len(resumed) == 1 and resumed[0].value >= 0.064
    _assert_complete(res, run)
    assert "attempt 2 resumes from" in d.output()
    _assert_same_batches_as_uninterrupted(res, run, seed=11, world=2)
    progress = [ln for ln in d.output().splitlines() if "[distill]" in ln and " kimg  loss " in ln]
    assert progress and all(a != b for a, b in zip(progress, progress[1:])), "a progress line printed twice"
    back = min(m.timestamp for m in _history(run.info.run_id, "train/attempt") if m.value == 2) / 1000
    fault_report.append(
        {
            "fault": "kill -9 of a Ray Train worker",
            "workers back and resumed (s)": back - t_kill,
            "resumed from kimg": resumed[0].value,
            "final kimg": res["distill"]["kimg"],
            "lost": f"no checkpoint; the steps after {resumed[0].value:g} kimg were redone",
        }
    )


def test_object_store_outage_delays_checkpoints_but_drops_none(
    first_pipeline, s3, stack_service, smoke, run_tag, tmp_path, fault_report
):
    """SeaweedFS stopped for about 10 s while a checkpoint is being written: the upload is retried until the
    store is back, every checkpoint arrives whole, and the run completes. HKD_FAULT_STALL_BEFORE_UPLOAD_S
    holds each upload 5 s, so that the outage meets one for certain (else it may meet only shard reads)."""
    every = 0.384
    d = Distill(
        [
            *smoke,
            *FAULT_TRAIN,
            f"train.checkpoint_every_kimg={every}",
            "train.seed=12",
            f"name=s3out-{run_tag}",
        ],
        tmp_path,
        env={"HKD_FAULT_STALL_BEFORE_UPLOAD_S": "5"},
    )
    d.wait_for(lambda: "about to be uploaded: stalling" in d.output(), "checkpoint upload")
    t_down = time.time()
    stack_service("stop", "s3")
    time.sleep(10)
    stack_service("start")
    t_up = time.time()
    res = d.finish()
    run = d.run(run_tag)
    _assert_complete(res, run)
    retries = _history(run.info.run_id, "checkpoint/upload_retries")
    assert max(m.value for m in retries) >= 1, "the checkpoint upload did not meet the outage"
    uploaded = {round(m.value * 1000) for m in _history(run.info.run_id, "checkpoint/kimg")}
    step = round(every * 1000)
    assert uploaded == set(range(step, round(TOTAL * 1000) + 1, step))  # every checkpoint, none dropped
    assert _assert_checkpoints_whole(s3, d.ray_prefix) >= 1
    assert "uploaded after" in d.output()
    first = min(_history(run.info.run_id, "checkpoint/upload_s"), key=lambda m: m.step)
    fault_report.append(
        {
            "fault": "SeaweedFS stopped during a checkpoint upload",
            "outage (s)": t_up - t_down,
            "that upload took (s)": first.value,
            "upload retries": max(m.value for m in retries),
            "final kimg": res["distill"]["kimg"],
            "lost": "nothing",
        }
    )


def test_tracking_server_restart_loses_no_metric(
    first_pipeline, stack_service, smoke, run_tag, tmp_path, fault_report
):
    """The MLflow server stopped for about 10 s mid-run: training goes on, the metrics of the outage wait in
    the worker's buffer and arrive once the server is back, in the same run."""
    d = Distill([*smoke, *FAULT_TRAIN, "train.seed=13", f"name=mlout-{run_tag}"], tmp_path)
    c = _client()
    d.wait_for(lambda: "[distill]" in d.output(), "training progress")
    t_down = time.time()
    stack_service("stop", "mlflow")
    time.sleep(3)  # and MLflow takes about 10 s to start again
    stack_service("start")
    t_up = time.time()
    res = d.finish()
    run = d.run(run_tag)
    _assert_complete(res, run)
    during = [
        m
        for m in c.get_metric_history(run.info.run_id, "train/loss")
        if t_down * 1000 <= m.timestamp <= t_up * 1000
    ]
    assert during, "no metric was logged while the server was down: the outage missed the training"
    assert run.data.tags["hkd.train_attempts"] == "1"  # the outage cost no restart
    import re

    waited = re.findall(r"mlflow reachable again after ([0-9.]+) s", d.output())
    fault_report.append(
        {
            "fault": "MLflow server stopped mid-run",
            "outage (s)": t_up - t_down,
            "metric buffer waited (s)": float(waited[0]) if waited else "-",
            "metric values logged during the outage, arrived": len(during),
            "total run wall (s)": res["distill"]["wall_s"],
            "lost": "nothing",
        }
    )


def test_a_burst_logged_while_the_server_is_down_arrives_complete(local_stack, stack_service, run_tag):
    """Issue 28: 1,300 metric values (more than two of the buffer's 500-value batches, over three keys) logged
    through a worker's Tracker while MLflow is stopped all stay buffered, and all arrive once it is back: every
    key's history holds every step with its own value, none twice, after close() returns."""
    from orchestrator.config import load
    from orchestrator.services.tracking import Tracker

    pc = load(["experiment=smoke", f"tracking.experiment=burst-{run_tag}"])
    tracker = Tracker(pc.tracking, background_flush_s=0.5)
    run_id = tracker.open_run(f"burst-{run_tag}", f"burst-{run_tag}", None, {"hkd.stage": "burst"})
    stack_service("stop", "mlflow")
    try:
        keys, steps = ("load/a", "load/b", "load/c"), 434
        for step in range(steps):
            tracker.log_metrics(run_id, {k: step + i / 10 for i, k in enumerate(keys)}, step)
        time.sleep(1.5)  # the background sender tries meanwhile, and keeps all of it
        assert tracker.pending() == len(keys) * steps
    finally:
        stack_service("start")
    tracker.close()
    assert tracker.pending() == 0
    c = _client()
    for i, k in enumerate(keys):
        got = sorted((m.step, m.value) for m in c.get_metric_history(run_id, k))
        assert got == [(s, pytest.approx(s + i / 10)) for s in range(steps)], k
