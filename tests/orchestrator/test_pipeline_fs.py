"""The one driver without any service: `hkd pipeline experiment=smoke storage=fs tracking=file` end to end,
with Ray started in this process, a local folder for storage and a local MLflow store (SQLite)."""

import json
import re

import pytest
import torch

from hkd_core.provenance import cpu_model, summary
from orchestrator import identity
from orchestrator.api import plan
from orchestrator.cli import main
from orchestrator.config import load

LEAN = [
    "experiment=smoke",
    "storage=fs",
    "tracking=file",
    "eval.teacher_nfe=[1]",
    "cluster.generation_tasks=1",
    "cluster.address=null",
    "eval.curve_n=16",
    "train.adversarial_weight=0.01",
]  # the discriminator's path too


pytestmark = pytest.mark.slow  # the smoke pipeline twice, in this process: minutes


@pytest.fixture(scope="module")
def fs_runs(tmp_path_factory):
    """The smoke pipeline in fs mode, with its progress bars and --headline (what it prints is kept), then the
    same command again without them (which must skip every finished stage)."""
    import contextlib
    import io

    import ray

    root = tmp_path_factory.mktemp("fs")
    over = LEAN + [f"storage.root={root}/store", f"tracking.root={root}/mlflow"]
    printed = {"out": io.StringIO(), "err": io.StringIO()}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):  # no service, even if one runs
            mp.delenv(var, raising=False)
        if ray.is_initialized():
            ray.shutdown()
        runs = []
        for i in range(2):
            out = root / f"res{i}.json"
            if i == 0:
                with contextlib.redirect_stdout(printed["out"]), contextlib.redirect_stderr(printed["err"]):
                    rc = main(
                        ["pipeline", *over, "--json", str(out), "--headline", str(root / "headline.json")]
                    )
            else:
                rc = main(["pipeline", *over, "--no-progress", "--json", str(out)])
            assert rc == 0, printed["err"].getvalue()[-3000:]
            runs.append(json.loads(out.read_text()))
        pc = load(over)
        ray.shutdown()
    yield {
        "root": root,
        "pc": pc,
        "first": runs[0],
        "again": runs[1],
        "over": over,
        "stdout": printed["out"].getvalue(),
        "stderr": printed["err"].getvalue(),
    }


def test_every_stage_writes_where_the_plan_says(fs_runs):
    pc, root = fs_runs["pc"], fs_runs["root"]
    assert pc.storage.kind == "fs" and fs_runs["first"]["_storage_root"] == str(root / "store" / "runs")
    steps = plan(pc, "evaluate")
    for stage in ("trajectories", "distill", "evaluate"):
        assert (root / "store" / "runs" / identity.stage_prefix(pc, stage) / "_SUCCESS.json").is_file()
        assert steps[stage]["output"].startswith(
            str(root / "store" / "runs" / identity.stage_prefix(pc, stage))
        )
    manifest = json.loads(
        (
            root / "store" / "runs" / identity.stage_prefix(pc, "trajectories") / "train" / "manifest.json"
        ).read_text()
    )
    assert manifest["num_trajectories"] == 128 and len(manifest["shards"]) == 4
    rec = torch.load(
        root / "store" / "runs" / identity.stage_prefix(pc, "distill") / "model.pt", weights_only=False
    )
    assert rec["class"] == "HKD" and rec["config"]["channels"] == 8  # the 'tiny' preset of experiment=smoke
    assert fs_runs["first"]["distill"]["kimg"] == pytest.approx(0.256)


def test_runs_and_metrics_land_in_the_local_mlflow_store(fs_runs):
    from mlflow.tracking import MlflowClient

    pc, first = fs_runs["pc"], fs_runs["first"]
    assert first["_tracking_uri"] == f"sqlite:///{fs_runs['root'] / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(first["_tracking_uri"])
    runs = {r.data.tags["hkd.run_key"]: r for r in client.search_runs([first["_experiment_id"]])}
    parent = runs[identity.run_key(pc, "pipeline")]
    assert parent.info.run_id == first["_parent_run_id"] and parent.info.status == "FINISHED"
    for stage in ("trajectories", "distill", "evaluate"):
        r = runs[identity.run_key(pc, stage)]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
    ev = runs[identity.run_key(pc, "evaluate")]
    assert set(
        "eval/fid eval/kid eval/kid_std eval/n eval/teacher_fid_nfe1 spectra/l1/alpha_mean bands/band0/low "
        "spectra_canonical/l1/alpha_mean spectra_canonical/l2/frac_growing bands/random1/high bands/image/mid".split()
    ) <= set(ev.data.metrics)
    assert ev.data.metrics["eval/n"] == 16 and ev.data.metrics["eval/fid"] > 0
    arts = {
        a.path for folder in ("spectra", "figures") for a in client.list_artifacts(ev.info.run_id, folder)
    }
    assert {
        "spectra/spectrum.png",
        "spectra/eigenvalues.npz",
        "spectra/spectrum_gauges.png",
        "figures/samples.png",
        "figures/samples_vs_teacher.png",
    } <= arts
    assert "headline.json" in {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert ev.data.metrics["eval/kid_ratio"] == pytest.approx(
        ev.data.metrics["eval/kid"] / ev.data.metrics["eval/teacher_kid_nfe1"]
    )
    assert ev.data.metrics["eval/noise_floor_fid"] > 0
    # artifacts stay beside the store, never in the working directory
    assert (fs_runs["root"] / "mlflow" / "artifacts").is_dir()
    # a model-training experiment (MLflow 3's UI opens it on the runs), and what each run consumed as dataset
    # inputs (the runs table's Dataset column)
    assert (
        client.get_experiment(first["_experiment_id"]).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    from hkd_core.config import config_hash

    distill = client.get_run(runs[identity.run_key(pc, "distill")].info.run_id)
    # the adversarial term ran on every worker with the data set's images (beyond the paper)
    assert {"train/loss_adv", "train/adv_d_loss", "train/adv_d_real"} <= set(distill.data.metrics)
    # what it trained on, in the MLflow UI: every Ray Train worker on this machine's CPU (hkd_core.provenance)
    here = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}) x{pc.cluster.num_workers}, torch "
    assert distill.data.tags["hkd.compute"].startswith(here + torch.__version__), distill.data.tags
    used = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in distill.inputs.dataset_inputs}
    assert used == {
        (identity.stage_prefix(pc, "trajectories"), pc.stages()["trajectories"], "training"),
        ("fashion_mnist/train", config_hash(pc.run.data), "teacher training"),
    }
    traj = next(
        i.dataset for i in distill.inputs.dataset_inputs if i.dataset.name.startswith("trajectories-")
    )
    assert json.loads(traj.source)["uri"] == first["trajectories"]["train"]["uri"]
    assert json.loads(traj.profile)["trajectories"] == 128
    ev_inputs = client.get_run(ev.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in ev_inputs] == [("fashion_mnist/test", "evaluation")]


def test_the_same_command_again_skips_every_finished_stage(fs_runs):
    first, again = fs_runs["first"], fs_runs["again"]
    assert again["_skipped"] == ["trajectories", "distill", "evaluate"]
    assert again["_parent_run_id"] == first["_parent_run_id"]  # the same MLflow run, reopened
    assert again["evaluate"]["metrics"] == pytest.approx(first["evaluate"]["metrics"])


def test_compare_overlays_the_spectra_of_runs_and_models_and_logs_them(fs_runs, tmp_path):
    """`hkd compare PIPELINE_RUN MODEL.pt`: the pipeline run resolves to its distilled model; a copy of it with
    every alpha shifted by 0.5 is W1 = 0.5 away in every level, the model itself 0; the table, the figure and
    the metrics land in a new MLflow run; a name that is nothing is refused with exit code 2. The pipeline's
    distill run scored FID at its checkpoints (eval.curve_n): its curve, read back from MLflow, is in the result,
    the table and a second figure; the two bare model files have no run and so no curve."""
    from mlflow.tracking import MlflowClient

    from hkd_core.models import model_from_record, model_record

    first = fs_runs["first"]
    over = LEAN + [f"storage.root={fs_runs['root']}/store", f"tracking.root={fs_runs['root']}/mlflow"]
    model_path = (
        fs_runs["root"] / "store" / "runs" / identity.stage_prefix(fs_runs["pc"], "distill") / "model.pt"
    )
    m = model_from_record(torch.load(model_path, weights_only=False))
    with torch.no_grad():
        for k in m.koopman:
            k.alpha.add_(0.5)
    torch.save(model_record(m), tmp_path / "shifted.pt")
    out = tmp_path / "cmp.json"
    assert (
        main(
            [
                "compare",
                *over,
                first["_parent_run_id"],
                str(model_path),
                str(tmp_path / "shifted.pt"),
                "--out",
                str(tmp_path / "cmp"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    rows = res["table"]["rows"]
    assert len(res["table"]["models"]) == 3 and {r["level"] for r in rows} == {1, 2}
    same = [r for r in rows if r["model"] == res["table"]["models"][1]]
    shifted = [r for r in rows if r["model"] == res["table"]["models"][2]]
    assert all(r["alpha_w1"] < 1e-6 for r in same)
    assert all(abs(r["alpha_w1"] - 0.5) < 1e-4 for r in shifted)
    # mode for mode after matching: the model itself agrees exactly, the shifted copy by its offset
    assert all(r["alpha_corr"] > 0.999 and abs(r["alpha_mean_diff"]) < 1e-6 for r in same)
    assert all(abs(r["alpha_mean_diff"] - 0.5) < 1e-4 for r in shifted)
    assert (tmp_path / "cmp" / "compare_spectra.png").stat().st_size > 10_000
    client = MlflowClient(first["_tracking_uri"])
    run = client.get_run(res["_run_id"])
    assert run.data.tags["hkd.stage"] == "compare"
    assert run.data.metrics["compare/model2/l1/alpha_w1_over_std"] > 0
    assert run.data.metrics["compare/model2/l1/alpha_mean_diff"] == pytest.approx(0.5, abs=1e-4)
    arts = {a.path for a in client.list_artifacts(res["_run_id"], "compare")}
    assert {
        "compare/compare_spectra.png",
        "compare/compare_alpha.png",
        "compare/compare_curves.png",
        "compare/compare.md",
        "compare/compare.json",
    } <= arts
    curves = res["curves"]
    assert (
        list(curves) == [res["table"]["models"][0]] and curves[res["table"]["models"][0]]["curve_n"] == "16"
    )
    pts = curves[res["table"]["models"][0]]["curve"]
    assert pts == first["distill"]["curve"]  # what the distill stage scored, read back
    assert [p["kimg"] for p in pts] == pytest.approx(
        [0.128]
    )  # the checkpoint before the end (evaluate scores it)
    assert all(p["fid"] > 0 and 0 < p["kid_std"] and p["train_s"] > 0 for p in pts)
    assert (tmp_path / "cmp" / "compare_curves.png").stat().st_size > 10_000
    # the default gauge is the canonical one: the reference row is the spectrum that evaluate logged in that gauge,
    # which is not the spectrum as trained (`--gauge trained` gives that one)
    ev = {r.data.tags["hkd.run_key"]: r for r in client.search_runs([first["_experiment_id"]])}[
        identity.run_key(fs_runs["pc"], "evaluate")
    ].data.metrics
    ref = [r for r in rows if r["model"] == res["table"]["models"][0]]
    assert res["table"]["gauge"] == "canonical" and run.data.tags["hkd.gauge"] == "canonical"
    for r in ref:
        assert r["alpha_mean"] == pytest.approx(ev[f"spectra_canonical/l{r['level']}/alpha_mean"], abs=1e-5)
        assert abs(r["alpha_mean"] - ev[f"spectra/l{r['level']}/alpha_mean"]) > 1e-3
    assert (
        main(
            [
                "compare",
                *over,
                str(model_path),
                "--gauge",
                "trained",
                "--out",
                str(tmp_path / "raw"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    raw = json.loads(out.read_text())["table"]
    assert raw["gauge"] == "trained"
    assert [r["alpha_mean"] for r in raw["rows"]] == pytest.approx(
        [ev[f"spectra/l{r['level']}/alpha_mean"] for r in raw["rows"]], abs=1e-6
    )
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"0.128: {pts[0]['fid']:.2f}" in md
    assert main(["compare", *over, "no-such-sweep"]) == 2


def test_the_canonical_spectrum_is_one_per_gauge_orbit(fs_runs):
    """What evaluate logs and `hkd compare` compares: a copy of the pipeline's model moved along its gauge orbit
    (alpha + c per mode, the encoder rescaled to match: the same outputs) has other raw eigenvalues but the same
    canonical spectrum, so the comparison table finds them equal mode for mode."""
    from hkd_core.gauge import gauge_transform
    from hkd_core.models import model_from_record
    from orchestrator.analysis.compare import compare_table
    from orchestrator.stages.evaluation import canonical_spectrum

    pc = fs_runs["pc"]
    path = fs_runs["root"] / "store" / "runs" / identity.stage_prefix(pc, "distill") / "model.pt"
    m = model_from_record(torch.load(path, weights_only=False)).eval()
    g = torch.Generator().manual_seed(3)
    moved = gauge_transform(m, [torch.randn(ev.shape[0], generator=g) * 0.3 for ev in m.spectrum()])
    raw = compare_table(["model", "moved"], [m.spectrum(), moved.spectrum()])["rows"]
    assert (
        max(abs(r.get("alpha_mean_diff", 0)) for r in raw) > 0.01
        or min(r.get("alpha_corr", 1) for r in raw) < 0.99
    )
    a, b = canonical_spectrum(pc, m), canonical_spectrum(pc, moved)
    for ea, eb in zip(a, b):
        assert torch.allclose(ea, eb, atol=2e-3)
    canon = [r for r in compare_table(["model", "moved"], [a, b])["rows"] if r["model"] == "moved"]
    assert all(r["alpha_corr"] > 0.999 and abs(r["alpha_mean_diff"]) < 1e-3 for r in canon)


def test_the_logged_model_loads_where_hkd_core_is_not_installed(fs_runs, tmp_path):
    """The MLflow model carries hkd_core's sources (code_paths, without the shipped weights): a process that
    cannot import the installed package (its editable finder removed, run from elsewhere) loads the model and
    samples with it, importing hkd_core from the model's own code folder."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    pc, first = fs_runs["pc"], fs_runs["first"]
    client = MlflowClient(first["_tracking_uri"])
    run = next(
        r
        for r in client.search_runs([first["_experiment_id"]])
        if r.data.tags.get("hkd.run_key") == identity.run_key(pc, "distill")
    )
    code = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
try:
    import hkd_core
    raise SystemExit("hkd_core is importable without the model: the test proves nothing")
except ImportError:
    pass
import mlflow.pytorch, torch
mlflow.set_tracking_uri({first["_tracking_uri"]!r})
m = mlflow.pytorch.load_model("runs:/{run.info.run_id}/model", map_location="cpu")
import hkd_core
assert "/code/hkd_core/" in hkd_core.__file__, hkd_core.__file__
x = m.sample(x_T=m.noise(2, torch.Generator().manual_seed(0)))
print("ok", type(m).__name__, tuple(x.shape))
"""
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().startswith("ok HKD (2, 1,"), r.stdout + r.stderr[-3000:]


def test_evaluate_shows_progress_and_writes_its_headline(fs_runs):
    """The evaluation counts the images it has scored of N, for the model, the teacher and the floor, and the
    pipeline ends with the headline: the KID ratio first, the FID ratio and the floor; --headline writes it as
    JSON with what makes it traceable (run id, config hash, commit, N)."""
    over = fs_runs["over"]
    bars = re.split(r"[\r\n]", fs_runs["stdout"] + fs_runs["stderr"])
    for what in ("evaluate: model at NFE 1", "evaluate: teacher at NFE 1", "evaluate: noise floor"):
        assert any(what in b and "0/16" in b for b in bars) and any(
            what in b and "16/16" in b for b in bars
        ), what
    h = json.loads((fs_runs["root"] / "headline.json").read_text())
    assert h["name"] == " ".join(over) and h["n"] == 16 and h["teacher_nfe"] == 1
    assert h["kid_ratio"] == pytest.approx(h["kid"] / h["teacher_kid"]) and h["floor_fid"] > 0
    assert h["config_hash"] == identity.pipeline_hash(load(over)) and h["commit"] == identity.git_sha()
    assert h["run_id"] and h["command"].startswith("hkd pipeline experiment=smoke")
    seg = fs_runs["first"]["distill"]["compute"]  # one segment, both ranks on one CPU: the headline says so
    assert [[g["ranks"] for g in s["workers"]] for s in seg] == [[[0, 1]]]
    assert h["trained_on"] == summary(seg)
    lines = [x for x in fs_runs["stdout"].splitlines() if x.startswith("  KID ratio ")]
    assert lines and f"{h['kid_ratio']:.2f}" in lines[0]


def test_an_evaluate_stage_run_again_takes_the_models_scores_from_the_cache(fs_runs, monkeypatch):
    """The model's scores are cached under the evaluation's identity and its weights' sha256 as soon as they are
    measured: an evaluate stage that failed after scoring (or is run again) scores nothing again and reports the
    same numbers. Runs last: it makes the evaluate stage run once more in the fixture's store."""
    import hashlib

    import ray

    from orchestrator.stages import evaluation as ev

    root, over = fs_runs["root"], fs_runs["over"]
    prefix = identity.stage_prefix(fs_runs["pc"], "distill")
    model = (root / "store" / "runs" / prefix / "model.pt").read_bytes()
    (cached,) = [
        json.loads(p.read_text()) for p in (root / "store").rglob("teacher-scores/**/model-n16-*.json")
    ]
    assert (
        cached["reference"]["model_sha256"] == hashlib.sha256(model).hexdigest()
        and cached["reference"]["n"] == 16
    )
    assert cached["scores"]["fid"] == pytest.approx(fs_runs["first"]["evaluate"]["metrics"]["eval/fid"])

    def refuse(*a, **k):
        raise AssertionError("scored again although its scores are cached")

    (root / "store" / "runs" / identity.stage_prefix(fs_runs["pc"], "evaluate") / "_SUCCESS.json").unlink()
    for var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ev, "sample_scores", refuse)
    monkeypatch.setattr(ev, "noise_floor", refuse)
    out = root / "again.json"
    try:
        assert main(["pipeline", *over, "--no-progress", "--json", str(out)]) == 0
    finally:
        ray.shutdown()
    res, first = json.loads(out.read_text()), fs_runs["first"]["evaluate"]["metrics"]
    assert "evaluate" not in res["_skipped"]
    assert [res["evaluate"]["metrics"][k] for k in ("eval/fid", "eval/kid")] == pytest.approx(
        [first["eval/fid"], first["eval/kid"]]
    )
