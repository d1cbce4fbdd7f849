"""The smoke sweep on the real stack: Ray Tune + Optuna + ASHA over Ray Train trials, tracked in MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hkd_core.provenance import cpu_model

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TAG = uuid.uuid4().hex[:6]
COMMON = [f"storage.prefix=sw-{TAG}", f"tracking.experiment=sw-{TAG}", f"tracking.register_model=sw-{TAG}"]
TRIALS = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())["trials"]


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _runs(filt: str):
    c = _client()
    exp = c.get_experiment_by_name(f"sw-{TAG}")
    return c.search_runs([exp.experiment_id], filt, max_results=500) if exp else []


def _tune_terminated(s3, sweep_id: str) -> set[str]:
    """The trials that Tune's newest experiment snapshot in the bucket records as ended (TERMINATED): what a
    resumed sweep restores. Tune writes the snapshot every second and uploads it in the background, so a trial
    that ended in MLflow a moment ago may still be RUNNING there, and a resume would rightly continue it."""
    prefix = f"sw-{TAG}/ray/sweeps/{sweep_id}/"  # the Tune experiment (rayfs.ray_storage: <prefix>/ray)
    listed = s3.list_objects_v2(Bucket="hkd", Prefix=prefix, Delimiter="/").get("Contents", [])
    states = sorted(o["Key"] for o in listed if o["Key"][len(prefix) :].startswith("experiment_state-"))
    if not states:
        return set()
    try:
        data = json.loads(s3.get_object(Bucket="hkd", Key=states[-1])["Body"].read())
    except (json.JSONDecodeError, s3.exceptions.NoSuchKey):
        return set()  # replaced while read: the next poll reads the new one
    trials = (json.loads(state) for state, _meta in data.get("trial_data", []))
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


@pytest.fixture(scope="module")
def smoke_sweep(local_stack, tmp_path_factory, fault_report, s3):
    """The smoke sweep, with its driver killed in the middle of a trial's checkpoint write, then resumed to
    the end. The kill lands in the most harmful instant: the checkpoint's file is in S3 but Ray Train's
    snapshot does not list it yet. HKD_FAULT_STALL_AFTER_UPLOAD_S holds uploads in that state for 8 s
    once a trial has ended (completed, or stopped by ASHA, in MLflow and in Tune's snapshot): the driver is killed
    as soon as another trial reports such a stall."""
    sweep_id = f"smoke-{TAG}"
    tmp = tmp_path_factory.mktemp("sweep")
    out, log = tmp / "summary.json", tmp / "driver.log"
    args = [
        sys.executable,
        "-m",
        "orchestrator",
        "sweep",
        str(ROOT / "sweeps" / "smoke.yaml"),
        *COMMON,
        "--no-progress",
    ]
    user_conf = tmp / "conf"  # the user's config folder, where the best trial's preset is written
    preset = user_conf / "experiment" / f"sweep_{sweep_id.replace('-', '_')}.yaml"
    # every stall leaves a file in `marks` as it begins (HKD_FAULT_STALL_MARK): the driver's log reaches its file
    # through Ray's log forwarding and the driver's buffer, possibly after the stall is over, or only at its exit
    marks, stall_s = tmp / "stalls", 8.0
    armed = tmp / "armed"  # the stalls begin once this file exists: after the first trial has ended
    env = {
        **os.environ,
        "HKD_FAULT_STALL_AFTER_UPLOAD_S": f"{stall_s:g}",
        "HKD_FAULT_STALL_MARK": str(marks),
        "HKD_FAULT_STALL_ARMED_BY": str(armed),
        "HKD_USER_CONF": str(user_conf),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        args + ["--id", sweep_id],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    t0 = time.monotonic()
    where = re.compile(
        r"s3://hkd/(\S+/sweeps-train/" + re.escape(sweep_id) + r"-(\w+)/checkpoint_[^/\s]+) uploaded"
    )

    def open_stalls() -> list[dict]:
        """The stalls under way now, with more than 3 s of their hold left (time enough to kill the driver)."""
        found = [json.loads(f.read_text()) for f in sorted(marks.glob("*"))] if marks.exists() else []
        return [s for s in found if s["t"] + s["stall_s"] - 3 > time.time() and where.search(s["what"])]

    def ended(why: str) -> str:
        return f"{why}; the driver's log ends:\n" + log.read_text(errors="replace")[-3000:]

    try:
        done = []
        while not done:
            # a trial that has ended: completed (FINISHED) or stopped by ASHA (KILLED, closed when Tune stopped it);
            # which comes first depends on the metric values, so either will do
            done = [
                r
                for status in ("FINISHED", "KILLED")
                for r in _runs(
                    f"tags.`hkd.sweep_id` = '{sweep_id}' and tags.`hkd.stage` = 'trial' and "
                    f"attributes.status = '{status}'"
                )
            ]
            # ... and that Tune's snapshot in the bucket records as ended too (else the resume would continue it)
            done = [r for r in done if r.data.tags["hkd.trial_id"] in _tune_terminated(s3, sweep_id)]
            assert done or proc.poll() is None, ended("the sweep ended before it could be interrupted")
            assert time.monotonic() - t0 < 600, ended("no trial finished within 600 s")
            time.sleep(0 if done else 1)
        before = {r.data.tags["hkd.trial_id"]: r.info.end_time for r in done}
        armed.touch()
        # another trial's checkpoint in the instant between its upload and Ray's record of it
        while not (stalls := open_stalls()):
            assert proc.poll() is None, ended("the sweep ended before a trial wrote another checkpoint")
            assert time.monotonic() - t0 < 700, ended("no checkpoint write after the first trial finished")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-write, its trials with it
        proc.wait()
    m = where.search(stalls[0]["what"])
    t_kill = time.monotonic()
    hit = {"trial_id": m.group(2), "checkpoint": m.group(1)}
    try:
        r = subprocess.run(
            args + ["--resume", sweep_id, "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=1200,
            env={**os.environ, "HKD_USER_CONF": str(user_conf)},
        )
        assert r.returncode == 0, r.stderr[-4000:]
        fault_report.append(
            {
                "fault": "sweep driver killed while a trial's checkpoint was in S3 but not yet "
                "in Ray's snapshot",
                "trial": hit["trial_id"],
                "resumed sweep finished after (s)": time.monotonic() - t_kill,
                "lost": "that trial's work since its last recorded checkpoint, redone",
            }
        )
        yield {
            **json.loads(out.read_text()),
            "finished_before_kill": before,
            "stdout": r.stdout,
            "interrupted_write": hit,
            "user_conf": user_conf,
            "preset_file": preset,
        }
    finally:
        preset.unlink(missing_ok=True)


def test_smoke_sweep_runs_trials_and_asha_stops_only_at_its_rungs(smoke_sweep):
    """Which trials ASHA stops depends on the order trials reach a rung (concurrent trials): assert on the rungs,
    not on a count. Every trial either completed the budget or stopped exactly at a rung."""
    from orchestrator.sweep.spec import asha_rungs, load

    rows = smoke_sweep["rows"]
    assert len(rows) == TRIALS
    stopped = [r for r in rows if r["status"].startswith("stopped early")]
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and len(stopped) + len(completed) == TRIALS
    rungs = asha_rungs(load(str(ROOT / "sweeps" / "smoke.yaml")), 0.256)
    assert rungs and all(g < 0.256 for g in rungs)
    assert all(any(r["kimg"] == pytest.approx(g) for g in rungs) for r in stopped), (rungs, stopped)
    assert all(r["kimg"] == pytest.approx(0.256) for r in completed)
    assert smoke_sweep["best"]["metric"] == min(r["metric"] for r in completed)
    assert "| rank | trial | status |" in smoke_sweep["stdout"]


def test_every_trial_has_its_mlflow_child_run(smoke_sweep):
    sweep_run = smoke_sweep["_sweep_run_id"]
    trials = _runs(f"tags.`hkd.sweep_id` = 'smoke-{TAG}' and tags.`hkd.stage` = 'trial'")
    assert (
        len(trials) == TRIALS and len({t.data.tags["hkd.trial_id"] for t in trials}) == TRIALS
    )  # none twice
    assert all(t.data.tags["mlflow.parentRunId"] == sweep_run for t in trials)
    c = _client()
    for t in trials:
        p = t.data.params
        dims, levels = json.loads(p["model/subspace_dims"]), int(p["model/levels"])
        assert len(dims) == levels and all(d % 2 == 0 for d in dims)  # every sampled config is valid
        assert len(c.get_metric_history(t.info.run_id, "eval/mse_vs_teacher")) >= 1
        # a trial that trained to its end says where, in one line (hkd_core.provenance)
        if "hkd.stopped_early" not in t.data.tags:
            assert t.data.tags["hkd.compute"].startswith(cpu_model() + " ("), t.data.tags
        # the Dataset column: the sweep's shared trajectories (by stage hash) and the teacher's training images
        inputs = c.get_run(t.info.run_id).inputs.dataset_inputs
        used = {(i.dataset.name.split("-")[0], i.tags[0].value): i.dataset for i in inputs}
        assert set(used) == {("trajectories", "training"), ("fashion_mnist/train", "teacher training")}, used
        assert (
            json.loads(used[("trajectories", "training")].source)["uri"]
            == t.data.tags["hkd.trajectories_uri"]
        )
    arts = {f.path for f in c.list_artifacts(sweep_run, "summary")}
    assert {"summary/trials.md", "summary/trials.csv"} <= arts
    assert any(a.startswith("summary/experiment_") and a.endswith(".yaml") for a in arts)
    sweeps = _runs(f"tags.`hkd.sweep_id` = 'smoke-{TAG}' and tags.`hkd.stage` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"


def test_the_sweep_registers_its_best_trial_by_fid_as_the_champion(smoke_sweep):
    """The sweep's end logs the completed trial with the lowest final FID as an MLflow model in that trial's run,
    registers it, and (a new registered model: no holder yet) moves the alias `champion` to it."""
    completed = [r for r in smoke_sweep["rows"] if r["status"] == "completed"]
    best = min(completed, key=lambda r: r["fid"])
    champ = smoke_sweep["champion"]
    assert champ["moved"] and champ["trial_id"] == best["trial_id"] and champ["model"] == f"sw-{TAG}"
    holder = _client().get_model_version_by_alias(f"sw-{TAG}", "champion")
    assert holder.run_id == champ["run_id"] and float(holder.tags["eval.fid"]) == pytest.approx(
        best["fid"], rel=1e-5
    )
    assert holder.tags["eval.n"] == str(int(best["eval_n"]))
    trial = _client().get_run(champ["run_id"])
    assert trial.data.tags["hkd.trial_id"] == best["trial_id"] and trial.info.status == "FINISHED"
    assert f"version {champ['version']} (trial {best['trial_id']}" in smoke_sweep["stdout"]


def test_no_trial_run_is_left_running_and_each_says_how_it_ended(smoke_sweep):
    """The sweep (killed once and resumed) ends every trial's child run: those ASHA stopped as KILLED with
    hkd.stopped_early=true and the kimg they reached, at the moment Tune stopped them (hkd.closed_at=stopped, not
    the sweep-end backstop), those that completed as FINISHED; none stays RUNNING."""
    rows = {r["trial_id"]: r for r in smoke_sweep["rows"]}
    trials = _runs(f"tags.`hkd.sweep_id` = 'smoke-{TAG}' and tags.`hkd.stage` = 'trial'")
    assert [t.data.tags["hkd.trial_id"] for t in trials if t.info.status == "RUNNING"] == []
    for t in trials:
        row = rows[t.data.tags["hkd.trial_id"]]
        if row["status"] == "completed":
            assert t.info.status == "FINISHED" and "hkd.stopped_early" not in t.data.tags
        else:
            assert row["status"].startswith("stopped early"), row
            assert t.info.status == "KILLED" and t.data.tags["hkd.stopped_early"] == "true"
            assert float(t.data.tags["hkd.stopped_at_kimg"]) == pytest.approx(row["kimg"])
            assert t.data.tags["hkd.closed_at"] == "stopped"  # by the driver's Tune callback, when it stopped


def test_resume_reran_no_finished_trial_and_continued_the_study(smoke_sweep, s3, tmp_path):
    """No finished trial ran again after the resume, and the Optuna study went on: the copy the sweep keeps in
    the bucket (sweeps/<id>/optuna.db, what a new head would resume from) holds every trial."""
    before = smoke_sweep["finished_before_kill"]
    trials = _runs(f"tags.`hkd.sweep_id` = 'smoke-{TAG}' and tags.`hkd.stage` = 'trial'")
    after = {t.data.tags["hkd.trial_id"]: t.info.end_time for t in trials}
    assert len(before) >= 1 and all(after[k] == v for k, v in before.items())
    import optuna

    copy = tmp_path / "optuna.db"
    s3.download_file("hkd", f"sw-{TAG}/sweeps/smoke-{TAG}/optuna.db", str(copy))
    study = optuna.load_study(study_name=f"smoke-{TAG}", storage=f"sqlite:///{copy}")
    assert len(study.trials) >= TRIALS


def test_best_config_is_a_usable_experiment_preset(smoke_sweep, monkeypatch):
    from orchestrator.config import CONF_DIR, load

    # written to the user's folder (HKD_USER_CONF), never into the installed package
    assert (
        smoke_sweep["preset_path"] == str(smoke_sweep["preset_file"]) and smoke_sweep["preset_file"].is_file()
    )
    assert not (CONF_DIR / "experiment" / smoke_sweep["preset_file"].name).exists()
    monkeypatch.setenv("HKD_USER_CONF", str(smoke_sweep["user_conf"]))
    pc = load([f"experiment={smoke_sweep['preset']}"])
    best = smoke_sweep["best"]["params"]
    assert pc.run.hkd_config().levels == best["model.levels"]
    assert pc.run.hkd_config().subspace_dims == best["model.subspace_dims"]


def test_resume_after_a_kill_during_a_checkpoint_write(smoke_sweep, s3):
    """The trial whose checkpoint write the kill interrupted went on in the resumed sweep (to its end, or until
    ASHA stopped it), in the same MLflow run; every checkpoint folder of the sweep in S3, the one the kill
    left unrecorded included, holds one whole checkpoint."""
    import io

    import torch

    hit = smoke_sweep["interrupted_write"]
    rows = {r["trial_id"]: r for r in smoke_sweep["rows"]}
    status = rows[hit["trial_id"]]["status"]
    assert status == "completed" or status.startswith("stopped early")  # not "error"
    runs = _runs(f"tags.`hkd.sweep_id` = 'smoke-{TAG}' and tags.`hkd.trial_id` = '{hit['trial_id']}'")
    assert len(runs) == 1  # one MLflow run for both drivers
    assert status != "completed" or runs[0].info.status == "FINISHED"
    train_root = hit["checkpoint"].split("/sweeps-train/")[0] + "/sweeps-train/"
    objs = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="hkd", Prefix=train_root)
        for o in page.get("Contents", [])
    ]
    ckpts = [k for k in objs if k.count("/") >= 2 and k.split("/")[-2].startswith("checkpoint_")]
    assert ckpts
    for k in ckpts:  # only whole checkpoint files in checkpoint folders
        assert k.rsplit("/", 1)[1].startswith("ckpt-"), k
        state = torch.load(
            io.BytesIO(s3.get_object(Bucket="hkd", Key=k)["Body"].read()),
            map_location="cpu",
            weights_only=False,
        )
        assert state["nimg"] / 1000 == pytest.approx(float(k.rsplit("/ckpt-", 1)[1][:-3]))
