"""`ray job submit` against the stack's `ray start --head`, running the pipeline to the end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_pipeline(local_stack, first_pipeline, smoke, run_tag, job_command):
    """Submitted as a job, `hkd pipeline` reuses the finished stages and evaluates anew (another eval seed),
    so the job's own driver spawns the sampling tasks and logs to MLflow."""
    dash = f"http://127.0.0.1:{local_stack['ports']['dashboard']}"
    env = {**os.environ, "RAY_ADDRESS": dash}
    cmd = job_command(["hkd", "pipeline", *smoke, "eval.seed=7", "eval.teacher_nfe=[]", "--no-progress"])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out
    # the driver left Ray's unpacked working dir (Ray replaces it when it sets up a worker there: issue 25)
    assert "ray job: the driver works in a private copy of its working directory" in out
    assert "stages skipped (already done): trajectories, distill" in out
    fid = first_pipeline[0]["evaluate"]["metrics"]["eval/fid"]
    line = next(x for x in out.splitlines() if x.startswith("HKD at NFE 1, N = 16: KID x1e3 "))
    assert f"FID {fid:.2f}" not in line and "floor at N = 16" in line  # new noise, a new number
    assert f"artifacts: s3://hkd/it-{run_tag}/" in out and "MLflow UI: http://127.0.0.1:" in out


def test_job_submit_needs_the_head_token(local_stack, tmp_path):
    """The stack's Ray head runs with RAY_AUTH_MODE=token (the pipeline job above went through with the token
    file from RAY_AUTH_TOKEN_PATH); without the token, or with another one, the submission is refused."""
    assert local_stack["env"]["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN_PATH" in local_stack["env"]
    dash = f"http://127.0.0.1:{local_stack['ports']['dashboard']}"
    ray = str(Path(sys.executable).parent / "ray")
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    base.update(RAY_ADDRESS=dash, HOME=str(tmp_path))  # and no ~/.ray/auth_token to fall back on
    cmd = [ray, "job", "submit", "--no-wait", "--", "python", "-c", "print('ran')"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=base, timeout=120)
    assert r.returncode != 0 and "couldn't find an authentication token" in r.stdout + r.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**base, "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120
    )
    assert r.returncode != 0 and "submitted successfully" not in r.stdout + r.stderr
    assert (
        "403" in r.stdout + r.stderr
        or "Invalid" in r.stdout + r.stderr
        or "nauthenticated" in r.stdout + r.stderr
    )
