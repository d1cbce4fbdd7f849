"""The tracking server a cluster runs (issue 25), here for real: PostgreSQL (Debian's package) holding MLflow's
backend store, its basic-auth users and the sweep's Optuna study; ``mlflow server --app-name basic-auth`` with
``--allowed-hosts`` and artifacts proxied to the local stack's S3 (infra/local/cluster_tracking.py, the rehearsal
of infra/kuberay/mlflow.yaml). Clients hold no secret in their environment: MLflow's user comes from the file
``HKD_MLFLOW_CREDENTIALS`` names (the Ray workers get the path), PostgreSQL's password from ``PGPASSFILE``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "infra" / "local" / "cluster_tracking.py"
TAG = uuid.uuid4().hex[:6]
COMMON = ["experiment=smoke", f"storage.prefix=ct-{TAG}", f"tracking.experiment=ct-{TAG}"]


def _have_postgres() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.fixture(scope="module")
def tracking(local_stack, tmp_path_factory):
    if not _have_postgres():
        if os.environ.get("HKD_CI") == "1":
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    sys.path.insert(0, str(ROOT / "infra" / "local"))
    from stack import free_ports

    state = tmp_path_factory.mktemp("cluster-tracking")
    pg, ml = free_ports(2)
    base = [sys.executable, str(TOOL), "--dir", str(state), "--stack-dir", str(local_stack["dir"])]
    t0 = time.monotonic()
    r = subprocess.run(
        base[:2]
        + ["start"]
        + base[2:]
        + ["--pg-port", str(pg), "--mlflow-port", str(ml), "--allowed-hosts", "mlflow.hkd.svc.cluster.local"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    started_s = time.monotonic() - t0
    env = {}
    for line in subprocess.run(
        base[:2] + ["env"] + base[2:], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines():
        k, v = line.removeprefix("export ").split("=", 1)
        env[k] = v
    try:
        yield {
            "env": env,
            "dir": state,
            "uri": env["MLFLOW_TRACKING_URI"],
            "mlflow_port": ml,
            "pg_port": pg,
            "started_s": started_s,
            "secrets": json.loads((state / "secrets.json").read_text()),
        }
    finally:
        subprocess.run(base[:2] + ["purge"] + base[2:], capture_output=True, timeout=120)


def _hkd(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    full = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**full, **env},
    )


def _client(tracking):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"] = "hkd-client"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = tracking["secrets"]["client"]
    return MlflowClient(tracking["uri"])


@pytest.fixture(autouse=True)
def _no_credentials_left():
    yield
    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)  # what _client put there, for this test only
    os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    headers = (
        {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()}
        if auth
        else {}
    )
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_basic_auth_and_allowed_hosts_refuse_before_any_stage(tracking):
    """No credentials: the server answers 401, and `hkd` says so in one sentence, exit 2, before any stage runs;
    a host name the server's --allowed-hosts does not list: 403 from MLflow, one sentence, exit 2."""
    api = f"{tracking['uri']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    assert _get(api) == 401
    assert _get(api, ("hkd-client", "not-the-password")) == 401
    assert _get(api, ("hkd-client", tracking["secrets"]["client"])) == 200

    env = {k: v for k, v in tracking["env"].items() if k != "HKD_MLFLOW_CREDENTIALS"}
    r = _hkd(["distill", *COMMON, "tracking.experiment=ct-refused"], env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"hkd: storage error: tracking server at {tracking['uri']} refused no credentials (HTTP 401: it runs with "
        f"basic authentication); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or point "
        f"HKD_MLFLOW_CREDENTIALS at a file with them (what the cluster's nodes use)"
    )
    other = f"localhost:{tracking['mlflow_port']}"
    r = _hkd(
        ["distill", *COMMON, "tracking.experiment=ct-refused", f"tracking.uri=http://{other}"],
        tracking["env"],
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"hkd: storage error: tracking server refused the host name {other}: its --allowed-hosts does not list it"
        )
    )
    assert _client(tracking).get_experiment_by_name("ct-refused") is None  # nothing written


def test_a_stage_runs_on_postgres_with_auth_and_no_secret_reaches_mlflow(tracking, s3):
    """`hkd distill` (trajectories, then distill on two Ray Train workers) against the server: every stage's
    run FINISHED in PostgreSQL, the training metrics that rank 0 sends from a Ray worker there too (the worker
    authenticated through the credentials file), the model's artifacts through the server's S3 proxy; no
    password in any parameter, tag or line of output."""
    t0 = time.monotonic()
    r = _hkd(["distill", *COMMON, "cluster.num_workers=2", "train.total_kimg=0.128"], tracking["env"])
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    c = _client(tracking)
    exp = c.get_experiment_by_name(f"ct-{TAG}")
    runs = {x.data.tags.get("hkd.stage"): x for x in c.search_runs([exp.experiment_id], max_results=50)}
    assert {"pipeline", "trajectories", "distill"} <= set(runs), sorted(
        runs
    )  # (the empirical teacher: no run)
    assert all(runs[s].info.status == "FINISHED" for s in ("pipeline", "trajectories", "distill"))
    distill = runs["distill"]
    assert len(c.get_metric_history(distill.info.run_id, "train/loss")) >= 2  # from rank 0, a Ray worker
    # the logged model (MLflow 3: its own artifact location) went through the server's proxy into S3
    models = c.search_logged_models(experiment_ids=[exp.experiment_id])
    assert models and all(m.source_run_id in {x.info.run_id for x in runs.values()} for m in models)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="hkd", Prefix="mlflow-artifacts-cluster/").get("Contents", [])
    ]
    assert any(k.endswith("model.pth") or "/data/" in k or k.endswith("MLmodel") for k in keys), keys[:20]
    sec = tracking["secrets"]
    blob = json.dumps([{**x.data.params, **x.data.tags} for x in runs.values()]) + r.stdout + r.stderr
    assert not any(v in blob for v in (sec["client"], sec["db"], sec["admin"]))
    # the backend store is PostgreSQL: the runs are rows there (read with libpq's password file, as clients do)
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=tracking["pg_port"],
        user="hkd",
        dbname="mlflow",
        passfile=tracking["env"]["PGPASSFILE"],
    ) as conn:
        n = conn.execute(
            "SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),)
        ).fetchone()[0]
    assert n == len(runs)
    print(
        f"\ncluster tracking: server up in {tracking['started_s']:.1f} s; hkd distill (2 stages) {took:.1f} s"
    )


def test_a_sweep_keeps_its_optuna_study_in_postgres_and_resumes_on_a_new_driver(
    tracking, s3, tmp_path, monkeypatch
):
    """The smoke sweep's two trials one after the other, its Optuna study in the same PostgreSQL (RDBStorage, no
    password in the URL), the driver killed once the first trial has ended, then `--resume` from a new driver,
    which reads the first trial from PostgreSQL and runs the second: every trial in the study once; a wrong
    database password is one sentence, exit 2, before any trial. (One at a time: the second trial is not run
    twice, before the kill and again after it; trials at once are test_sweep's.)"""
    import optuna

    spec = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    url = tracking["env"]["HKD_OPTUNA_STORAGE"]
    # one report per trial, no scheduler: this test is about where the study lives, test_sweep about ASHA
    spec.update(
        {
            "name": "smoke-pg",
            "trials": 2,
            "max_concurrency": 1,
            "study_storage": url,
            "base": ["experiment=smoke", "train.total_kimg=0.128"],
            "scheduler": {"type": "fifo"},
        }
    )
    path = tmp_path / "smoke-pg.yaml"
    path.write_text(yaml.safe_dump(spec))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "study_storage": url.replace("hkd@", "hkd:wrong@")}))
    r = _hkd(["sweep", str(bad), *COMMON[1:]], tracking["env"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"hkd: sweep error: study_storage ({bad}): ")
        and "password authentication failed" in last
    )
    assert "wrong" not in last  # the URL shown with its password masked

    sweep_id = f"pg-{TAG}"
    log = tmp_path / "driver.log"
    env = {**os.environ, **tracking["env"], "RAY_DEDUP_LOGS": "0"}
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    # no model registered at the sweep's end: the registry is test_sweep's; this test is about the study's storage
    args = [
        sys.executable,
        "-m",
        "orchestrator",
        "sweep",
        str(path),
        *COMMON[1:],
        "tracking.register_model=null",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        args + ["--id", sweep_id],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    c = _client(tracking)
    t0 = time.monotonic()
    try:
        while True:
            exp = c.get_experiment_by_name(f"ct-{TAG}")
            ended = (
                c.search_runs(
                    [exp.experiment_id],
                    f"tags.`hkd.sweep_id` = '{sweep_id}' and tags.`hkd.stage` = "
                    f"'trial' and attributes.status != 'RUNNING'",
                )
                if exp
                else []
            )
            # ... with its result in the bucket (final.json, put just after its run ends): a resumed sweep reports
            # that trial rather than running it again
            results = (f"ct-{TAG}/sweeps/{sweep_id}/{t.data.tags['hkd.trial_id']}/final.json" for t in ended)
            if any(s3.list_objects_v2(Bucket="hkd", Prefix=k).get("KeyCount", 0) for k in results):
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - t0 < 600, "no trial ended within 600 s"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert f"{spec['trials']} trials, 1 at a time" in log.read_text()
    t_resume_ms = time.time() * 1000
    out = tmp_path / "summary.json"
    r = subprocess.run(
        args + ["--resume", sweep_id, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert len(summary["rows"]) == spec["trials"]
    monkeypatch.setenv("PGPASSFILE", tracking["env"]["PGPASSFILE"])
    study = optuna.load_study(study_name=sweep_id, storage=url)  # the study, read from PostgreSQL
    states = [t.state.name for t in study.trials]
    # a trial Optuna handed out after Tune's last snapshot before the kill is marked FAIL on resume (Tune asks anew
    # for what it re-runs): never left RUNNING; the others are the spec's trials, each completed or pruned
    done = [s for s in states if s != "FAIL"]
    assert len(done) == spec["trials"] and set(done) <= {"COMPLETE", "PRUNED"}, states
    # the first trial ended under the killed driver, the second under the new one, after it read the study
    rows = {row["trial_id"] for row in summary["rows"]}
    ends = sorted(
        t.info.end_time
        for t in c.search_runs(
            [exp.experiment_id], f"tags.`hkd.sweep_id` = '{sweep_id}' and tags.`hkd.stage` = 'trial'"
        )
        if t.data.tags["hkd.trial_id"] in rows
    )
    assert len(ends) == spec["trials"] and ends[0] < t_resume_ms < ends[1], (ends, t_resume_ms)
