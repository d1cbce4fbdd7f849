"""`ray job submit` against the stack's `ray start --head`, running the pipeline to the end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXCLUDES = [".venv", ".stack", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info"]


def test_ray_job_submit_runs_the_pipeline(local_stack, first_pipeline, smoke, run_tag):
    """Submitted as a job, `hkd pipeline` reuses the finished stages and evaluates anew (another eval seed),
    so the job's own driver spawns the sampling tasks and logs to MLflow."""
    dash = f"http://127.0.0.1:{local_stack['ports']['dashboard']}"
    env = {**os.environ, "RAY_ADDRESS": dash}
    runtime_env = {"excludes": EXCLUDES}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "hkd", "pipeline", *smoke, "eval.seed=7", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert "stages skipped (already done): trajectories, distill" in out
    fid = first_pipeline[0]["evaluate"]["metrics"]["eval/fid"]
    assert "FID@32 (NFE 1):" in out and f"FID@32 (NFE 1): {fid:.2f}" not in out    # new noise, a new number
    assert f"artifacts: s3://hkd/it-{run_tag}/" in out and "MLflow UI: http://127.0.0.1:" in out
