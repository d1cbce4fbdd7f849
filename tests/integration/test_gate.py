"""Every command that touches S3 or MLflow first runs preflight's cheap part (``orchestrator.services.preflight.gate``):
a refused key, a bucket that does not exist and a tracking server that does not answer each fail with one
sentence and exit code 2, before Ray starts, and nothing is written to S3 or MLflow. Against the real SeaweedFS
and MLflow servers of the local stack."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid

import pytest

from orchestrator.services.preflight import gate
from orchestrator.services.storage import StorageConfig, StorageError

pytestmark = pytest.mark.integration


# runs `hkd ARGS` and says on its last stderr line whether the process ever imported ray: "before Ray starts"
# asserted as "Ray was not even imported", which no log line Ray may or may not print can fake
_RUN = (
    "import runpy, sys\nsys.argv = ['hkd'] + sys.argv[1:]\ntry:\n    runpy.run_module('orchestrator', "
    "run_name='__main__')\nfinally:\n    print('ray imported:', 'ray' in sys.modules, file=sys.stderr)\n"
)


def _hkd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-c", _RUN, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    lines = r.stderr.rstrip().splitlines()
    assert lines and lines[-1].startswith("ray imported: "), r.stderr[-2000:]
    r.ray_imported = lines[-1] == "ray imported: True"
    r.stderr = "\n".join(lines[:-1]) + "\n"
    return r


def _experiment_exists(name: str) -> bool:
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name(name) is not None


def _bucket_exists(s3, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except ClientError:
        return False


def test_wrong_secret_is_one_sentence_exit_2_and_nothing_written(local_stack, tmp_path):
    endpoint = local_stack["env"]["AWS_ENDPOINT_URL"]
    bad = tmp_path / "credentials"
    bad.write_text("[default]\naws_access_key_id = hkd\naws_secret_access_key = not-the-secret\n")
    exp = f"gate-{uuid.uuid4().hex[:6]}"

    t0 = time.perf_counter()
    with pytest.raises(StorageError) as e:
        gate(StorageConfig(endpoint_url=endpoint, credentials_file=str(bad)))
    assert time.perf_counter() - t0 < 5

    r = _hkd(
        "pipeline",
        "experiment=smoke",
        f"tracking.experiment={exp}",
        env={"AWS_SHARED_CREDENTIALS_FILE": str(bad)},
    )
    message = (
        f"bad credentials: {endpoint} refused the access key for s3://hkd (403); the keys came from the file "
        f"{bad} [default] (storage.credentials_file, set from AWS_SHARED_CREDENTIALS_FILE): fix them there, "
        f"or point storage.credentials_file "
        f"(AWS_SHARED_CREDENTIALS_FILE) at the right file"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"hkd: storage error: {message}"
    assert str(e.value).startswith(f"bad credentials: {endpoint} refused the access key for s3://hkd")
    assert "Traceback" not in r.stderr and not r.ray_imported
    assert "not-the-secret" not in r.stderr + r.stdout
    assert not _experiment_exists(exp)  # nothing written to MLflow


def test_bucket_typo_is_refused_unless_create_bucket(local_stack, s3):
    endpoint = local_stack["env"]["AWS_ENDPOINT_URL"]
    typo = f"hkdd-{uuid.uuid4().hex[:6]}"
    exp = f"gate-{uuid.uuid4().hex[:6]}"

    t0 = time.perf_counter()
    with pytest.raises(StorageError):
        gate(StorageConfig(endpoint_url=endpoint, bucket=typo))
    assert time.perf_counter() - t0 < 5

    r = _hkd("pipeline", "experiment=smoke", f"storage.bucket={typo}", f"tracking.experiment={exp}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"hkd: storage error: missing bucket: s3://{typo} does not exist at {endpoint} (storage.bucket); check the "
        f"name, or create it with storage.create_bucket=true"
    )
    assert "Traceback" not in r.stderr and not r.ray_imported
    assert not _bucket_exists(s3, typo) and not _experiment_exists(exp)  # nothing created, nothing written

    # asked for: created by the gate, and then there
    done = gate(dataclasses.replace(StorageConfig(endpoint_url=endpoint, bucket=typo), create_bucket=True))
    assert done == [f"s3://{typo} created at {endpoint} (storage.create_bucket)"]
    assert _bucket_exists(s3, typo)
    assert gate(StorageConfig(endpoint_url=endpoint, bucket=typo))[0].startswith(
        f"s3://{typo} at {endpoint} answers"
    )


def test_dead_tracking_server_is_refused_before_anything_is_written(local_stack, free_port):
    dead = f"http://127.0.0.1:{free_port()}"
    prefix = f"gate-{uuid.uuid4().hex[:6]}"
    r = _hkd("pipeline", "experiment=smoke", f"tracking.uri={dead}", f"storage.prefix={prefix}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"hkd: storage error: tracking server unreachable: nothing answers at {dead} (tracking.uri / "
            f"MLFLOW_TRACKING_URI"
        )
    )
    assert "Traceback" not in r.stderr and not r.ray_imported
    from orchestrator.services.storage import S3Store

    assert (
        S3Store(StorageConfig(endpoint_url=local_stack["env"]["AWS_ENDPOINT_URL"], prefix=prefix)).list()
        == []
    )


def test_every_service_command_runs_the_gate(local_stack):
    """sweep, study, edit, compare, data push and ship-teacher refuse the same typo the same way (the gate runs
    before their own work)."""
    typo = f"hkdd-{uuid.uuid4().hex[:6]}"
    for args in (
        ["study", "experiment=smoke", "--variants", "hkd"],
        ["edit", "experiment=smoke"],
        ["compare", "nosuchrun"],
        ["sweep", "sweeps/smoke.yaml"],
        ["data", "push", "fashion_mnist"],
        ["ship-teacher", "experiment=smoke", "--out", "/nonexistent/shipped"],
    ):
        r = _hkd(*args, f"storage.bucket={typo}")
        assert (
            r.returncode == 2
            and f"missing bucket: s3://{typo} does not exist" in r.stderr.strip().splitlines()[-1]
        ), (args, r.stderr[-1500:])
        assert not r.ray_imported, args


def test_wrong_ray_token_or_address_is_one_sentence_before_any_stage(local_stack, tmp_path, free_port):
    """The Ray head the driver joins is asked first, with the driver's token (issue 25): a wrong token and an
    address where nothing answers are each one sentence and exit 2 within seconds (``ray.init`` alone retries
    for 20 to 40 s and ends in a bare ConnectionError), and no stage runs (no MLflow experiment is created)."""
    bad = tmp_path / "ray_token"
    bad.write_text("0" * 32 + "\n")
    bad.chmod(0o600)
    head = local_stack["env"]["RAY_ADDRESS"]
    for env, expect in (
        (
            {"RAY_AUTH_TOKEN_PATH": str(bad)},
            f"hkd: storage error: Ray refused this driver's token: the head at {head} runs with token "
            f"authentication and the token from {bad} (RAY_AUTH_MODE=token) is missing or wrong",
        ),
        (
            {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"},
            "hkd: storage error: Ray unreachable: nothing answers at 127.0.0.1:",
        ),
    ):
        exp = f"gate-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        r = _hkd("pipeline", "experiment=smoke", f"tracking.experiment={exp}", env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(expect), r.stderr[-1500:]
        assert "Traceback" not in r.stderr and time.perf_counter() - t0 < 20
        assert not _experiment_exists(exp)
    # the right token passes, and says what it checked
    from orchestrator.services.raycheck import ray_check

    assert ray_check(head).startswith(f"Ray at {head} answers (auth token")
