"""The pipeline end to end on the real stack: Ray (2 Train workers), SeaweedFS S3, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.integration


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _runs(experiment: str, filt: str = ""):
    c = _client()
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filt, max_results=200) if exp else []


def _keys(s3, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"Bucket": "hkd", "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        page = s3.list_objects_v2(**kw)
        out += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def test_pipeline_end_to_end(first_pipeline, s3, run_tag, smoke):
    res, _ = first_pipeline
    parent = res["_parent_run_id"]
    runs = {
        r.data.tags["hkd.stage"]: r
        for r in _runs(f"it-{run_tag}")
        if r.data.tags.get("mlflow.parentRunId") == parent
    }
    assert set(runs) == {"trajectories", "distill", "evaluate"}  # the empirical teacher needs no run
    assert all(r.info.status == "FINISHED" for r in runs.values())

    c = _client()
    distill = runs["distill"]
    loss = c.get_metric_history(distill.info.run_id, "train/loss")
    assert len(loss) >= 3 and [m.step for m in loss] == sorted(m.step for m in loss)
    assert loss[-1].step == 256  # step = images seen: 0.256 kimg
    assert (
        distill.data.params["train/total_kimg"] == "0.256" and distill.data.params["model/preset"] == "tiny"
    )
    for tag in ("hkd.config_hash", "hkd.trajectories_uri", "hkd.model_uri", "hkd.data"):
        assert distill.data.tags.get(tag), tag
    # the commit that ran: this checkout's HEAD (CI runs from a git clone), also as MLflow's own tag
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.strip()
    assert len(head) == 40, "the tests run from a git checkout"
    assert distill.data.tags["hkd.git_sha"] == head == distill.data.tags["mlflow.source.git.commit"]
    # what the machines did (MLflow's System Metrics tab): the driver's machine on every stage's run, and the
    # node that rank 0 trained on, under its own name, on the distill run
    for stage, run in runs.items():
        assert "system/cpu_utilization_percentage" in run.data.metrics, (stage, sorted(run.data.metrics)[:20])
        assert "system/system_memory_usage_megabytes" in run.data.metrics, stage
    rank0 = c.get_metric_history(distill.info.run_id, "system/train_rank0/cpu_utilization_percentage")
    assert rank0 and all(0 <= m.value <= 100 for m in rank0)
    versions = c.search_model_versions("name='hkd-it'")
    assert any(v.run_id == distill.info.run_id for v in versions)
    # the evaluation's numbers on the logged model's page (MLflow 3's model_id), and on its registered version,
    # and the alias `champion` on the best version by FID at this N
    mine = next(v for v in versions if v.run_id == distill.info.run_id)
    model_id = runs["evaluate"].data.tags["hkd.model_id"]
    on_model = {m.key: m.value for m in c.get_logged_model(model_id).metrics}
    # the model's page holds every evaluation of that model (other tests evaluate it again, at other N):
    # its FID is one of the evaluate runs' that name this model
    evals = c.search_runs([distill.info.experiment_id], f"tags.`hkd.model_id` = '{model_id}'")
    assert runs["evaluate"].info.run_id in {r.info.run_id for r in evals}
    assert any(on_model["eval/fid"] == pytest.approx(r.data.metrics["eval/fid"]) for r in evals)
    assert "eval/kid" in on_model and c.get_logged_model(model_id).source_run_id == distill.info.run_id
    # each evaluation point once in the run's history (it was logged twice: plain, then with the model's id)
    fid_points = c.get_metric_history(runs["evaluate"].info.run_id, "eval/fid")
    assert len(fid_points) == len({m.step for m in fid_points}), [(m.step, m.value) for m in fid_points]
    tagged = float(c.get_model_version("hkd-it", mine.version).tags["eval.fid"])
    assert any(tagged == pytest.approx(r.data.metrics["eval/fid"], rel=1e-5) for r in evals)
    champ = c.get_model_version_by_alias("hkd-it", "champion")
    assert champ.tags["eval.n"] == "16"
    assert float(champ.tags["eval.fid"]) <= runs["evaluate"].data.metrics["eval/fid"] * (1 + 1e-6)

    ev = runs["evaluate"].data.metrics
    assert ev["eval/n"] == 16 and ev["eval/fid"] > 0 and "eval/kid" in ev and "eval/teacher_fid_nfe11" in ev
    if ev["eval/teacher_kid_nfe11"] > ev["eval/teacher_kid_std_nfe11"]:  # the headline
        assert ev["eval/kid_ratio"] == pytest.approx(ev["eval/kid"] / ev["eval/teacher_kid_nfe11"])
    else:  # at N = 16 the teacher's KID can be within its std of 0: no ratio rather than a meaningless one
        assert "eval/kid_ratio" not in ev
    assert ev["eval/noise_floor_fid"] > 0  # measured at this N and cached
    from hkd_core.models import build_model
    from orchestrator.config import load

    pc = load(smoke)
    levels = len(build_model(pc.run.model.variant, pc.run.hkd_config()).spectrum())
    assert levels >= 2
    stats = (
        "alpha_mean",
        "alpha_min",
        "alpha_max",
        "alpha_std",
        "abs_beta_mean",
        "frac_growing",
        "num_modes",
    )
    expected = {f"spectra/l{l}/{s}" for l in range(1, levels + 1) for s in stats}
    assert expected <= set(ev), sorted(expected - set(ev))  # every spectrum scalar, every level
    assert not any(k.startswith(f"spectra/l{levels + 1}/") for k in ev)
    ev_id = runs["evaluate"].info.run_id
    arts = {f.path for d in ("figures", "spectra", "config") for f in c.list_artifacts(ev_id, d)}
    assert {
        "figures/samples.png",
        "figures/band_masking.png",
        "figures/band_masking_levels.png",
        "figures/trajectory.png",
        "figures/band_trajectory.png",
        "figures/band_energy.png",
        "spectra/spectrum.png",
        "spectra/alpha_maps.png",
        "spectra/eigenvalues.npz",
        "config/resolved.json",
        "figures/samples_vs_teacher.png",
    } <= arts
    import mlflow
    import numpy as np

    local = mlflow.artifacts.download_artifacts(
        run_id=ev_id, artifact_path="spectra/eigenvalues.npz", tracking_uri=os.environ["MLFLOW_TRACKING_URI"]
    )
    with np.load(local) as z:  # the raw eigenvalues, per level
        assert sorted(z.files) == sorted(
            [f"level{l}" for l in range(1, levels + 1)]
            + [f"canonical_level{l}" for l in range(1, levels + 1)]
        )
        for l in range(1, levels + 1):
            e = z[f"level{l}"]
            assert np.iscomplexobj(e) and e.size == ev[f"spectra/l{l}/num_modes"]
            assert float(np.real(e).mean()) == pytest.approx(
                ev[f"spectra/l{l}/alpha_mean"], rel=1e-5, abs=1e-7
            )
            c = z[f"canonical_level{l}"]  # the canonical gauge's eigenvalues: the same modes, other rates
            assert c.shape == e.shape
            assert float(np.real(c).mean()) == pytest.approx(
                ev[f"spectra_canonical/l{l}/alpha_mean"], rel=1e-5, abs=1e-7
            )

    keys = _keys(s3, f"it-{run_tag}/")
    names = [k.split("/", 1)[1] for k in keys]
    assert any(n.startswith("trajectories-") and n.endswith("/train/manifest.json") for n in names)
    assert sum(n.endswith(".npz") and "/train/shard-" in n for n in names) == 4  # 128 / 32
    assert any(n.startswith("ray/distill-") and "/checkpoint_" in n and n.endswith(".pt") for n in names)
    assert any(n.startswith("distill-") and n.endswith("/model.pt") for n in names)
    done = {n.split("-", 1)[0] for n in names if n.endswith("/_SUCCESS.json")}
    assert done == {"trajectories", "distill", "evaluate"}  # the empirical teacher writes nothing


def test_second_pipeline_skips_finished_stages(first_pipeline, smoke, run_tag):
    res1, _ = first_pipeline
    before = len(_runs(f"it-{run_tag}"))
    out = os.path.join(os.path.dirname(os.environ["AWS_SHARED_CREDENTIALS_FILE"]), f"second-{run_tag}.json")
    assert main(["pipeline", *smoke, "--no-progress", "--json", out]) == 0
    res2 = json.loads(open(out).read())
    assert res2["_skipped"] == ["trajectories", "distill", "evaluate"]
    assert res2["evaluate"]["metrics"]["eval/fid"] == res1["evaluate"]["metrics"]["eval/fid"]
    assert res2["_parent_run_id"] == res1["_parent_run_id"]  # the same MLflow run, reopened
    assert len(_runs(f"it-{run_tag}")) == before  # no stage run created or redone


def test_invalid_config_fails_before_ray_starts(local_stack, smoke, run_tag):
    before = len(_runs(f"it-{run_tag}"))
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "pipeline", *smoke, "model.subspace_dims=[8,15]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "model.subspace_dims[1] (level 2) is 15" in r.stderr
    assert "ray" not in r.stderr.lower().replace("array", "")
    assert len(_runs(f"it-{run_tag}")) == before


def test_distill_resumes_in_the_same_run_after_the_driver_is_killed(local_stack, s3, smoke, run_tag):
    args = [
        *smoke,
        "train.total_kimg=0.384",
        "train.checkpoint_every_kimg=0.064",
        "train.log_every_kimg=0.032",
        f"name=resume-{run_tag}",
    ]
    from orchestrator.config import load

    ray_prefix = f"it-{run_tag}/ray/distill-{load(args).stages()['distill']}/"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "distill", *args, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0 = time.monotonic()

    def recorded() -> bool:
        """A checkpoint counts once Ray Train's checkpoint manager snapshot lists it: a checkpoint whose files
        reached S3 a moment before the driver died, but not the snapshot, is not one Ray can resume from."""
        snap = f"{ray_prefix}checkpoint_manager_snapshot.json"
        if snap not in _keys(s3, ray_prefix):
            return False
        return bool(
            json.loads(s3.get_object(Bucket="hkd", Key=snap)["Body"].read()).get("checkpoint_results")
        )

    try:
        while not recorded():
            assert proc.poll() is None, "the first attempt ended before it could be interrupted"
            assert time.monotonic() - t0 < 300, "no checkpoint was recorded in S3 within 300 s"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its Ray Train workers go with it
        proc.wait()
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "distill", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [
        x
        for x in _runs(f"it-{run_tag}")
        if x.data.tags.get("hkd.stage") == "distill"
        and x.data.tags.get("hkd.run_key", "").startswith(f"resume-{run_tag}/")
    ]
    assert len(runs) == 1  # one MLflow run for both attempts
    run = runs[0]
    assert run.data.tags["hkd.attempt"] == "2" and run.info.status == "FINISHED"
    c = _client()
    resumed = c.get_metric_history(run.info.run_id, "train/resumed_from_kimg")
    assert resumed and resumed[-1].value >= 0.064
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/kimg")]
    # every logging point once, or twice where the second attempt redid what the first did after its checkpoint
    assert set(steps) == set(range(32, 385, 32)) and len(steps) < 2 * 12


def test_edit_logs_the_grid_and_scores_beside_the_pipeline_run(first_pipeline, smoke, run_tag, tmp_path):
    """`hkd edit` on the smoke pipeline's model: r = 0 is the original for both methods; figures and the
    numbers land in an MLflow run nested under the pipeline's run."""
    res, _ = first_pipeline
    out = tmp_path / "edit.json"
    assert (
        main(
            [
                "edit",
                *smoke,
                "--mask",
                "lower",
                "--band",
                "high",
                "--bands",
                "2",
                "--ratios",
                "0,0.5,1",
                "--samples",
                "3",
                "--reference",
                "data:3,17",
                "--controls",
                "2",
                "--out",
                str(tmp_path / "figs"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["params"]["references"] == [
        "fashion_mnist test #3",
        "fashion_mnist test #17",
        "fashion_mnist test #3",
    ]
    rows = {row["r"]: row for row in r["rows"]}
    assert rows[0.0]["band_structure_kept"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0.0]["random_detail_arrived"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0.0]["all_detail_arrived"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1.0]["all_structure_kept"] < 1.0 - 1e-4  # the baseline moved the coarse image
    run = _client().get_run(r["_run_id"])
    assert (
        run.data.tags["mlflow.parentRunId"] == res["_parent_run_id"] and run.data.tags["hkd.stage"] == "edit"
    )
    assert run.data.tags["hkd.model_uri"] == res["distill"]["model_uri"]
    arts = {f.path for f in _client().list_artifacts(r["_run_id"], "edit")}
    assert {
        "edit/edit_grid.png",
        "edit/edit_tradeoff.png",
        "edit/edit_scores.md",
        "edit/edit_scores.json",
    } <= arts
    hist = _client().get_metric_history(r["_run_id"], "edit/all_structure_kept")
    assert sorted(m.step for m in hist) == [0, 50, 100]
    # every mean with its bootstrap interval, and the band's paired difference from its control
    lo = {
        m.step: m.value
        for m in _client().get_metric_history(r["_run_id"], "edit/band_minus_random_detail_arrived_lo")
    }
    hi = {
        m.step: m.value
        for m in _client().get_metric_history(r["_run_id"], "edit/band_minus_random_detail_arrived_hi")
    }
    assert sorted(lo) == [0, 50, 100] and all(lo[k] <= hi[k] for k in lo)
    assert (
        rows[1.0]["band_detail_arrived_ci"][0]
        <= rows[1.0]["band_detail_arrived"]
        <= rows[1.0]["band_detail_arrived_ci"][1]
    )
    # a config whose model was never distilled: a clear error naming where it looked
    assert main(["edit", *smoke, "train.total_kimg=0.5"]) == 2
