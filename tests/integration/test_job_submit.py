"""`ray job submit` against the stack's `ray start --head`, running the pipeline to the end."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXCLUDES = [".venv", ".stack", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info"]


def test_ray_job_submit_runs_the_pipeline(local_stack):
    tag = uuid.uuid4().hex[:6]
    dash = f"http://127.0.0.1:{local_stack['ports']['dashboard']}"
    env = {**os.environ, "RAY_ADDRESS": dash}
    runtime_env = {"excludes": EXCLUDES}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "hkd", "pipeline", "experiment=smoke", f"storage.prefix=job-{tag}", f"tracking.experiment=job-{tag}",
           f"name=job-{tag}", "tracking.register_model=null", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert "FID@32 (NFE 1):" in out and f"s3://hkd/job-{tag}" in out and "MLflow UI: http://127.0.0.1:" in out
