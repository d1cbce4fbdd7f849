"""No access key, secret or Ray token anywhere a user or a log reader could see it. Runs after every other integration
test (see conftest.py), so it searches what the pipeline, the resumed distillation, `ray job submit` and the
sweep left: every MLflow run's params, tags and artifacts, every object in the S3 bucket, every Ray job's
metadata and logs, and every file the stack's servers wrote (Ray's session folder included)."""

from __future__ import annotations

import configparser
import os
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _secrets(local_stack) -> list[bytes]:
    ini = configparser.ConfigParser()
    ini.read(local_stack["env"]["AWS_SHARED_CREDENTIALS_FILE"])
    out = [ini["default"]["aws_access_key_id"], ini["default"]["aws_secret_access_key"]]
    out.append(Path(local_stack["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip())  # the Ray head's token
    assert all(len(s) >= 8 for s in out)
    return [s.encode() for s in out]


def _leaks(data: bytes, secrets: list[bytes]) -> bool:
    return any(s in data for s in secrets)


def test_no_secret_in_mlflow_s3_ray_jobs_or_logs(local_stack, first_pipeline, s3):
    from mlflow.tracking import MlflowClient

    secrets = _secrets(local_stack)
    found: list[str] = []

    # MLflow: params, tags, metric names, artifacts of every run of every experiment
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id], max_results=1000)]
    assert len(runs) >= 4
    n_artifacts = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            text = repr(r.data.params) + repr(r.data.tags) + repr(sorted(r.data.metrics))
            if _leaks(text.encode(), secrets):
                found.append(f"mlflow run {r.info.run_id} params/tags")
            stack = [None]
            while stack:
                for f in c.list_artifacts(r.info.run_id, stack.pop()):
                    if f.is_dir:
                        stack.append(f.path)
                        continue
                    n_artifacts += 1
                    local = c.download_artifacts(r.info.run_id, f.path, tmp)
                    if _leaks(Path(local).read_bytes(), secrets):
                        found.append(f"mlflow artifact {r.info.run_id}/{f.path}")
    assert n_artifacts >= 10

    # S3: every object in the bucket (checkpoints, shards, manifests, Ray's and Tune's run state, models)
    n_objects = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="hkd"):
        for o in page.get("Contents", []):
            n_objects += 1
            if _leaks(s3.get_object(Bucket="hkd", Key=o["Key"])["Body"].read(), secrets):
                found.append(f"s3://hkd/{o['Key']}")
    assert n_objects >= 20

    # Ray: every submitted job's entrypoint, runtime env, metadata and logs
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(f"http://127.0.0.1:{local_stack['ports']['dashboard']}")
    for j in jobs.list_jobs():  # submitted jobs, and the drivers that joined the head (no submission id)
        info = repr((j.entrypoint, j.runtime_env, j.metadata)).encode()
        if _leaks(info, secrets):
            found.append(f"ray job {j.submission_id or j.job_id} metadata")
        if j.submission_id and _leaks(jobs.get_job_logs(j.submission_id).encode(), secrets):
            found.append(f"ray job {j.submission_id} logs")

    # Files the servers wrote: logs, Ray's session folder, MLflow's database; not the credentials file (the
    # secret's home), SeaweedFS's identity config or its volume files (their objects were read above)
    state = Path(local_stack["dir"])
    skip = {state / "credentials", state / "s3.json", state / "ray_token"}
    n_files = 0
    for p in state.rglob("*"):
        if not p.is_file() or p in skip or "seaweedfs" in p.relative_to(state).parts or p.is_symlink():
            continue
        n_files += 1
        try:
            if _leaks(p.read_bytes(), secrets):
                found.append(str(p.relative_to(state)))
        except OSError:
            pass  # a socket or a file that vanished while we looked
    assert n_files >= 20
    assert not found, "secret found in:\n" + "\n".join(found[:50])
