"""Real Ray clusters on this machine. First, two nodes (infra/local/cluster.py): a head on 127.0.0.2 with 3 CPUs and
a worker node on 127.0.0.3 with 2, separate `ray start` processes with their own temp dirs, HOME and cache, token
authentication on, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset. Jobs go in with `ray job submit` and no
HKD_DATA_DIR: the data set and the Inception weights come from the stack's S3 (`hkd data push`), checkpoints and
trajectories go through S3, metrics to the stack's MLflow. What the nodes still share is this machine's virtual
environment and its S3 credentials file (as every pod of a KubeRay cluster mounts one secret at one path).
Second (below), a cluster whose head has 0 CPUs, and which grows while a sweep runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hkd_core.data import DATASETS
from orchestrator.services.datasets import dataset_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
TOTAL = 0.512  # kimg; a checkpoint every 0.064: the kill lands after the first, long before the end


def _cluster_module():
    spec = importlib.util.spec_from_file_location(
        "hkd_local_cluster", ROOT / "infra" / "local" / "cluster.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUNNING: list = []  # the clusters this module started; the next one stops them first (two cores hold one)


def _start(tmp_path_factory, name: str, cpus: list[int], first_ip: str):
    """A LocalCluster of its own, after the ones before it stopped; started again once (fresh ports and folder)
    when its nodes do not come up, as a Ray GCS on a loaded two-core machine once did not within 300 s."""
    while RUNNING:
        RUNNING.pop().stop()
    for attempt in (1, 2):
        c = _cluster_module().LocalCluster(tmp_path_factory.mktemp(name))
        try:
            c.start(cpus, first_ip=first_ip, env=dict(os.environ))
            RUNNING.append(c)
            return c
        except SystemExit as e:
            c.stop()
            if attempt == 2:
                raise
            print(f"cluster {name} did not start ({str(e).splitlines()[0]}); starting it again")


@pytest.fixture(scope="module")
def cluster(local_stack, tmp_path_factory):
    c = _start(tmp_path_factory, "cluster", [3, 2], HEAD)
    try:
        yield c
    finally:
        c.stop()


def _hkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def submit(job_command):
    """``submit(cluster, entrypoint, log, env_vars=None)``: `ray job submit` to that cluster (its address and token,
    no HKD_DATA_DIR), output to ``log``; returns the running process."""

    def run(cluster, entrypoint: list[str], log: Path, env_vars: dict | None = None) -> subprocess.Popen:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("HKD_DATA_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        }
        env.update(cluster.client_env())
        cmd = job_command(entrypoint, env_vars)
        return subprocess.Popen(
            cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    return run


def _finish(proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> str:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    return log.read_text(errors="replace")


def test_the_cluster_has_two_nodes_on_their_own_addresses(cluster, tmp_path, submit):
    """ray.nodes(), from a job's driver on the head: two live nodes, on 127.0.0.2 and 127.0.0.3, the worker node
    with its own resource; nothing bound to 127.0.0.1."""
    code = (
        "import json, ray; ray.init(); print('NODES', json.dumps([[n['NodeManagerAddress'], n['Alive'], "
        "sorted(n['Resources'])] for n in ray.nodes()]))"
    )
    log = tmp_path / "nodes.log"
    out = _finish(submit(cluster, ["python", "-c", code], log), log, 300)
    assert "succeeded" in out, out[-3000:]
    nodes = json.loads(out.split("NODES ", 1)[1].splitlines()[0])
    assert sorted((ip, alive) for ip, alive, _ in nodes) == [(HEAD, True), (WORKER, True)]
    assert "node1" in dict((ip, res) for ip, _, res in nodes)[WORKER]
    assert {r["node_ip"] for r in cluster.alive_nodes()} == {HEAD, WORKER}


def test_pipeline_on_two_nodes_survives_losing_one(cluster, s3, run_tag, tmp_path, fault_report, submit):
    """`ray job submit` of the stages through distill with the two Train workers on different nodes (SPREAD), the
    data set from S3 only (storage.data_source=s3; the nodes' caches are empty). Once Ray
    Train has recorded a checkpoint, the worker node's raylet is killed
    (kill -9): the worker group restarts on the head from that checkpoint, in the same MLflow run, and the run
    ends at the full kimg; both placements are in the run's tags."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load

    name = "fashion_mnist"
    r = _hkd("data", "push", name)
    assert r.returncode == 0, r.stderr
    args = [
        "experiment=smoke",
        "cluster.num_workers=2",
        "cluster.placement_strategy=SPREAD",
        "storage.data_source=s3",
        f"train.total_kimg={TOTAL}",
        "train.checkpoint_every_kimg=0.064",
        "train.log_every_kimg=0.032",
        "train.seed=31",
        f"storage.prefix=mn-{run_tag}",
        f"tracking.experiment=it-{run_tag}",
        f"name=mn-{run_tag}",
        "eval.teacher_nfe=[]",
    ]
    h = load(args).stages()["distill"]
    snap = f"mn-{run_tag}/ray/distill-{h}/checkpoint_manager_snapshot.json"
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    # through distill: what a lost node costs is training's; the evaluation on empty caches is the zero-CPU
    # head's test below
    proc = submit(cluster, ["hkd", "distill", *args, "--no-progress"], log)

    def recorded() -> bool:
        try:
            state = json.loads(s3.get_object(Bucket="hkd", Key=snap)["Body"].read())
        except s3.exceptions.NoSuchKey:
            return False
        return bool(state.get("checkpoint_results"))

    while not recorded():
        assert proc.poll() is None, (
            f"the job ended before a checkpoint was recorded:\n{log.read_text()[-4000:]}"
        )
        assert time.monotonic() - t0 < 600, "no checkpoint recorded within 600 s"
        time.sleep(0.25)
    t_kill = cluster.kill_raylet(1)
    out = _finish(proc, log)
    assert "succeeded" in out, out[-5000:]
    assert (
        f"data: {DATASETS[name].file} fetched from s3://hkd/{dataset_key(name)}" in out
    )  # the bucket's copy
    assert {r["node_ip"] for r in cluster.alive_nodes()} == {HEAD}

    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name(f"it-{run_tag}")
    runs = c.search_runs(
        [exp.experiment_id], f"tags.`hkd.stage_hash` = '{h}' and tags.`hkd.stage` = 'distill'"
    )
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one distillation"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["hkd.train_attempts"] == "2"
    assert run.data.metrics["train/kimg"] == pytest.approx(TOTAL)
    first = json.loads(run.data.tags["hkd.worker_nodes.1"])
    second = json.loads(run.data.tags["hkd.worker_nodes.2"])
    assert sorted(v["ip"] for v in first.values()) == [HEAD, WORKER]  # one worker on each node
    assert sorted(sum((v["ranks"] for v in first.values()), [])) == [0, 1]
    assert [(v["ip"], sorted(v["ranks"])) for v in second.values()] == [(HEAD, [0, 1])]  # both on the head
    hist = {m.value: m for m in c.get_metric_history(run.info.run_id, "train/nodes")}
    assert sorted(hist) == [1.0, 2.0]
    resumed = c.get_metric_history(run.info.run_id, "train/resumed_from_kimg")
    assert len(resumed) == 1 and resumed[0].value >= 0.064
    back = (
        min(m.timestamp for m in c.get_metric_history(run.info.run_id, "train/attempt") if m.value == 2)
        / 1000
    )
    assert "attempt 1: 2 workers on 2 nodes" in out and "attempt 2: 2 workers on 1 node" in out
    fault_report.append(
        {
            "fault": "kill -9 of the worker node's raylet (2-node cluster)",
            "workers back on the head and resumed (s)": back - t_kill,
            "resumed from kimg": resumed[0].value,
            "final kimg": run.data.metrics["train/kimg"],
            "lost": f"the worker node; the steps after {resumed[0].value:g} kimg were redone",
        }
    )


def test_a_data_file_whose_hash_does_not_match_is_refused_by_the_job(cluster, s3, run_tag, tmp_path, submit):
    """The bucket's copy of the data set altered: the job's driver refuses it, naming the object and what to do,
    before any stage runs."""
    name = "fashion_mnist"
    assert _hkd("data", "push", name).returncode == 0
    bucket = f"hkd-mn-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=bucket)
    body = bytearray(s3.get_object(Bucket="hkd", Key=dataset_key(name))["Body"].read())
    body[4096] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=dataset_key(name), Body=bytes(body))
    log = tmp_path / "bad.log"
    # a cache of its own: the head's has the good file from the test above, checked and used as it is
    out = _finish(
        submit(
            cluster,
            [
                "hkd",
                "pipeline",
                "experiment=smoke",
                f"storage.bucket={bucket}",
                "storage.data_source=s3",
                f"tracking.experiment=it-{run_tag}",
                f"name=mnbad-{run_tag}",
                "--no-progress",
            ],
            log,
            env_vars={"HKD_CACHE": str(tmp_path / "cache")},
        ),
        log,
        300,
    )
    assert "failed" in out and "succeeded" not in out
    assert (
        f"hkd: data error: s3://{bucket}/{dataset_key(name)} does not match its sha256" in out
        and f"push it again (hkd data push {name})" in out
    ), out[-3000:]
    assert "running (output" not in out  # no stage started


# A cluster as cluster guides build it (issue 25): the head started with `--num-cpus=0`, so every task, Train
# worker and trial runs on other nodes and rank 0 is never on the job driver's node; and a cluster that grows
# while a sweep runs: 127.0.0.4 (head), 127.0.0.5 and, added mid-sweep, 127.0.0.6.
ZHEAD, NODE1, NODE2 = "127.0.0.4", "127.0.0.5", "127.0.0.6"


@pytest.fixture(scope="module")
def zero_head(local_stack, tmp_path_factory):
    c = _start(tmp_path_factory, "zero-head", [0, 2], ZHEAD)
    try:
        for what in ("fashion_mnist", "inception"):  # the nodes' caches are empty: S3 only
            r = _hkd("data", "push", what)
            assert r.returncode == 0, r.stderr
        yield c
    finally:
        c.stop()


def _mlflow():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_the_pipeline_runs_end_to_end_with_no_work_on_the_head(
    zero_head, run_tag, tmp_path, measured, submit
):
    """`ray job submit -- hkd pipeline` through evaluate: the driver sits on the head (0 CPUs), the trajectory
    tasks, the Train worker (rank 0) and the evaluation on the worker node (data and Inception weights from S3
    only); the model is logged from the driver
    after training, with the job's working dir replaced meanwhile (the issue's FileNotFoundError)."""
    args = [
        "experiment=smoke",
        "cluster.num_workers=1",
        "storage.data_source=s3",
        f"storage.prefix=zh-{run_tag}",
        f"tracking.experiment=zh-{run_tag}",
        f"name=zh-{run_tag}",
    ]
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    out = _finish(submit(zero_head, ["hkd", "pipeline", *args, "--no-progress"], log), log)
    took = time.monotonic() - t0
    assert "succeeded" in out, out[-5000:]
    assert "KID ratio" in out  # the headline, printed by the driver
    # the evaluation ran on the worker node, whose cache is empty: the Inception weights came from the bucket
    assert "inception: weights fetched from s3://hkd/weights/" in out
    c = _mlflow()
    exp = c.get_experiment_by_name(f"zh-{run_tag}")
    runs = {r.data.tags["hkd.stage"]: r for r in c.search_runs([exp.experiment_id], max_results=20)}
    assert {"pipeline", "trajectories", "distill", "evaluate"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values()), {
        k: r.info.status for k, r in runs.items()
    }
    placed = json.loads(runs["distill"].data.tags["hkd.worker_nodes"])
    assert [(v["ip"], v["ranks"]) for v in placed.values()] == [(NODE1, [0])]  # rank 0 off the driver's node
    assert runs["distill"].data.tags.get("hkd.model_uri") and c.search_model_versions(
        f"run_id = '{runs['distill'].info.run_id}'"
    ), "the model was not logged after training"
    measured.append(
        f"zero-CPU head ({ZHEAD}): `ray job submit -- hkd pipeline` (smoke) through evaluate in {took:.0f} s, "
        f"rank 0 on {NODE1}"
    )


def test_a_sweep_sizes_for_the_cluster_at_its_largest_and_lands_trials_on_a_node_added_mid_sweep(
    zero_head, run_tag, tmp_path, measured, submit
):
    """Two trials of 2 CPUs each (the trial's own process + 1 Train worker), sized from cluster.max_cpus=4 (two
    such nodes) on a cluster that has one 2-CPU worker node: both trials start, and their Train workers wait as
    pending demand (the node's CPUs hold the two trials' processes), where a cluster sized from what is up would
    have started one. A node added then, as an autoscaler adds one for that demand, takes their workers: the
    trials' MLflow runs name the new node as where they trained, and the sweep ends."""
    spec = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    spec.update(
        {
            "name": "grow",
            "trials": 2,
            "base": ["experiment=smoke", "train.total_kimg=0.128"],
            "scheduler": {"type": "fifo"},
            "max_concurrency": None,
            "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        }
    )
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep_id = f"grow-{run_tag}"
    common = [
        f"storage.prefix=zh-{run_tag}",
        f"tracking.experiment=zh-{run_tag}",
        "storage.data_source=s3",
        "cluster.max_cpus=4",
    ]
    log = tmp_path / "sweep.log"
    proc = submit(zero_head, ["hkd", "sweep", str(path), *common, "--id", sweep_id, "--no-progress"], log)
    c = _mlflow()
    t0 = time.monotonic()

    def trials():
        exp = c.get_experiment_by_name(f"zh-{run_tag}")
        filt = f"tags.`hkd.sweep_id` = '{sweep_id}' and tags.`hkd.stage` = 'trial'"
        return c.search_runs([exp.experiment_id], filt) if exp else []

    while len(trials()) < 2:  # both trials started: the node holds their processes
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() - t0 < 600, "two trials did not start within 600 s"
        time.sleep(1)
    time.sleep(5)
    assert not any("hkd.worker_nodes" in r.data.tags for r in trials()), (
        "a trial trained before the node came"
    )
    assert zero_head.add_node(2) == NODE2
    out = _finish(proc, log, 1200)
    assert "succeeded" in out, out[-5000:]
    assert "2 trials, 2 at a time (from the cluster at its largest (cluster.max_cpus=4" in out
    ips = {
        r.data.tags["hkd.trial_id"]: [v["ip"] for v in json.loads(r.data.tags["hkd.worker_nodes"]).values()]
        for r in trials()
        if "hkd.worker_nodes" in r.data.tags
    }
    assert len(ips) == 2 and any(NODE2 in v for v in ips.values()), ips
    assert not any(ZHEAD in v for v in ips.values())  # never on the 0-CPU head
    measured.append(
        f"growing cluster: sweep {sweep_id}, {time.monotonic() - t0:.0f} s; the trials' hkd.worker_nodes: "
        + "; ".join(f"{t} on {', '.join(v)}" for t, v in sorted(ips.items()))
        + f" (head {ZHEAD}, 0 CPUs; {NODE1} from the start; {NODE2} added mid-sweep)"
    )
