"""Hydra composition and validation: every error names its key, before anything runs."""

import pytest

from hkd_core.config import ConfigError
from orchestrator.config import compose, from_composed, load


def test_defaults_compose_into_the_core_schema():
    pc = load([])
    assert (
        pc.run.data.name == "fashion_mnist" and pc.run.model.preset == "small" and pc.cluster.num_workers == 2
    )
    assert pc.storage.bucket == "hkd" and pc.run.hkd_config().subspace_dims == [32, 64, 64]
    assert set(pc.stages()) == {"teacher", "trajectories", "distill", "evaluate"}


def test_experiment_overrides_only_what_changes():
    base, smoke = compose([]), compose(["experiment=smoke"])
    assert smoke["model"]["preset"] == "tiny" and smoke["trajectories"]["num"] == 128
    assert (
        smoke["teacher"]["kind"] == "empirical" != base["teacher"]["kind"]
    )  # smoke: the closed-form teacher
    assert smoke["storage"] == base["storage"]
    cifar = load(["experiment=cifar_gpu"])
    assert cifar.run.data.name == "cifar10_jpeg" and cifar.run.teacher.kind == "edm" and cifar.cluster.use_gpu


def test_overrides_reach_the_model():
    pc = load(["data=mnist", "model.levels=3", "model.subspace_dims=[16,32,32]", "model.operator=shared"])
    cfg = pc.run.hkd_config()
    assert pc.run.data.name == "mnist" and cfg.subspace_dims == [16, 32, 32] and cfg.operator == "shared"


@pytest.mark.parametrize(
    "overrides, msg",
    [
        (["model.levelz=3"], "unknown key model.levelz"),
        (
            ["data=svhn"],
            "Could not find 'data/svhn' ; available options in 'data': cifar10_jpeg fashion_mnist mnist",
        ),
        (
            ["model.subspace_dims=[8,15,16]"],
            r"model.subspace_dims\[1\] \(level 2\) is 15; each d_l must be even",
        ),
        (["model.levels=2", "model.subspace_dims=[8,16,16]"], "has 3 entries .* but model.levels is 2"),
        (
            ["model.levels=6", "model.subspace_dims=[2,2,2,2,2,2]", "data.resolution=28"],
            "resolution 28 allows at most 3 levels",
        ),
        (["cluster.num_workers=3"], "train.batch_size=32 is not divisible by cluster.num_workers=3"),
        (["experiment=smoke", "cluster.num_workers=8"], "makes 4 shards, fewer than cluster.num_workers=8"),
        (["cluster.use_gpu=true"], "cluster.use_gpu is true but cluster.gpus_per_worker is 0"),
        (
            ["storage.endpoint_url=127.0.0.1:8333"],
            "storage.endpoint_url='127.0.0.1:8333' must start with http",
        ),
        (["storage.bucket="], "storage.bucket is empty"),
        (
            ["tracking.uri=mlflow.example.org"],
            "tracking.uri='mlflow.example.org' is not an MLflow tracking URI",
        ),
        (["train.lr=fast"], "train.lr='fast' must be of type float"),
        (["cluster.num_workers=0"], "cluster.num_workers=0 must be >= 1"),
        (
            ["storage=s3"],
            "storage.bucket comes from the environment variable HKD_S3_BUCKET, which is not set",
        ),
    ],
)
def test_bad_configs(overrides, msg, monkeypatch):
    monkeypatch.delenv("HKD_S3_BUCKET", raising=False)
    with pytest.raises(ConfigError, match=msg):
        load(overrides)


def test_unknown_top_level_key():
    d = compose([])
    d["clusterr"] = {}
    with pytest.raises(ConfigError, match="unknown key clusterr"):
        from_composed(d)


def test_storage_root_is_part_of_a_runs_key():
    """The same config against another bucket or prefix is another MLflow run (never one reopened run whose
    artifacts would sit in two buckets); the stages' content hashes do not change."""
    from orchestrator import identity

    a = from_composed(compose(["storage.bucket=hkd"]))
    b = from_composed(compose(["storage.bucket=hkdd"]))
    c = from_composed(compose(["storage.prefix=other"]))
    assert identity.pipeline_hash(a) == identity.pipeline_hash(b) == identity.pipeline_hash(c)
    for stage in ("pipeline", "distill"):
        keys = {identity.run_key(x, stage) for x in (a, b, c)}
        assert len(keys) == 3, keys
    assert identity.run_key(a, "pipeline").endswith("@s3://hkd/runs")


def test_git_sha_prefers_the_given_commit_and_never_passes_off_garbage(monkeypatch, tmp_path):
    """HKD_GIT_SHA (an image's build argument, a job's env_vars) wins; else the checkout's HEAD (40 hex); with
    neither (no .git, no git binary) the tag says "unknown", and no mlflow.source.git.commit is set."""
    import re

    from orchestrator import identity

    monkeypatch.setenv("HKD_GIT_SHA", "a" * 40)
    assert identity.git_sha() == "a" * 40
    monkeypatch.delenv("HKD_GIT_SHA")
    monkeypatch.setattr(identity, "_CHECKOUT_SHA", None)
    sha = identity.git_sha()
    assert re.fullmatch(r"[0-9a-f]{40}", sha)  # the tests run from a git checkout
    monkeypatch.setattr(identity, "ROOT", tmp_path)  # the checkout moved on (or went):
    assert identity.git_sha() == sha  # the commit the process started with
    monkeypatch.setattr(identity, "_CHECKOUT_SHA", None)  # a process that starts here now:
    assert identity.git_sha() == "unknown"  # not a checkout, git prints nothing
    monkeypatch.setattr(identity, "_CHECKOUT_SHA", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert identity.git_sha() == "unknown"
    tags = identity.lineage(from_composed(compose([])))
    assert tags["hkd.git_sha"] == "unknown" and "mlflow.source.git.commit" not in tags


def test_ray_noise_is_kept_off_the_terminal_and_the_rest_passes(monkeypatch):
    """The driver's echo of worker and raylet lines drops Ray's internal chatter (placement-group cleanup,
    the PreemptionWatcher warning, worker-count warnings) and passes everything else through unchanged."""
    import ray._private.worker as rw

    from orchestrator.services import raycluster

    got = []
    monkeypatch.setattr(
        rw, "print_to_stdstream", lambda data, ignore_prefix: got.append((data, ignore_prefix))
    )
    monkeypatch.delenv("HKD_RAY_VERBOSE", raising=False)
    raycluster.quiet_ray_echo()
    raycluster.quiet_ray_echo()  # idempotent: one filter, not two
    echo = rw.print_to_stdstream
    echo(
        {
            "lines": ["Failed to query Ray Train Controller actor state. State API may be ...", "   ^^^^"],
            "actor_name": "PlacementGroupCleaner",
            "pid": 7,
        },
        False,
    )
    echo(
        {
            "lines": [
                "[distill] 1.02/5 kimg  loss 0.3",
                "[2026 E 1 2] core_worker.cc:2465: Actor with class name: "
                "'PreemptionWatcher' and ID: 'ab' has constructor arguments in the object store and max_restarts",
            ],
            "actor_name": "RayTrainWorker",
            "pid": 8,
        },
        False,
    )
    echo(
        {
            "lines": [
                "WARNING: 8 PYTHON worker processes have been started on node: x with address: 127.0.0.1."
            ],
            "pid": "raylet",
        },
        False,
    )
    echo(
        {
            "lines": [
                "Reporting training result 10: TrainingReport(checkpoint=None, metrics={'train/loss': 2.2})"
            ],
            "actor_name": "RayTrainWorker",
            "pid": 8,
        },
        False,
    )
    assert got == [
        ({"lines": ["[distill] 1.02/5 kimg  loss 0.3"], "actor_name": "RayTrainWorker", "pid": 8}, False)
    ]
