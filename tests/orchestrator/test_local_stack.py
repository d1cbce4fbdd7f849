"""The local stack (infra/local/stack.py): what its head hands to jobs, and a port another program holds."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_stack_head_hands_its_jobs_the_checkouts_data_folder(tmp_path):
    """A job submitted to the local stack's head runs in Ray's copy of the working directory, where no
    shared/data sits beside it: the head gets HKD_DATA_DIR = the checkout's shared/data (or the caller's own)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stack_mod", ROOT / "infra" / "local" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    checkout = tmp_path / "work" / "main"
    checkout.mkdir(parents=True)
    assert stack.head_data_dir(checkout, {}) is None  # nothing to hand over
    inside = checkout / "shared" / "data"
    inside.mkdir(parents=True)
    assert stack.head_data_dir(checkout, {}) == inside.resolve()
    beside = tmp_path / "work" / "shared" / "data"
    beside.mkdir(parents=True)
    assert stack.head_data_dir(checkout, {}) == beside.resolve()  # beside the checkout comes first
    assert stack.head_data_dir(checkout, {"HKD_DATA_DIR": str(tmp_path)}) == tmp_path.resolve()
    assert stack.head_data_dir(checkout, {"HKD_DATA_DIR": ""}) == beside.resolve()


def test_the_stack_refuses_a_port_another_program_holds(tmp_path):
    """A port already taken is an error that names it (and the flag that moves it) before anything starts, not
    a 'ready' taken from the other program's answer; SeaweedFS's gRPC ports (+10000) count too. Telemetry off."""
    import importlib.util
    import socket
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("stack_mod2", ROOT / "infra" / "local" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        free = stack.free_ports(1)[0]
        with pytest.raises(SystemExit, match=f"port {taken} on 127.0.0.1 for mlflow is taken.*--mlflow-port"):
            stack.require_free({"ports": {"mlflow": taken}}, ["mlflow"])
        stack.require_free({"ports": {"mlflow": free}}, ["mlflow"])  # a free one passes
        if taken > 10000:
            with pytest.raises(SystemExit, match=f"port {taken} .*gRPC port, --s3-port \\+ 10000"):
                stack.require_free({"ports": {"s3": taken - 10000}}, ["s3"], grpc=True)
        # the command itself: exit 1 with that sentence, nothing started, no state left running
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "infra" / "local" / "stack.py"),
                "start",
                "--dir",
                str(tmp_path / "st"),
                "--s3-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and f"port {taken} on 127.0.0.1 for s3 is taken" in r.stderr
        assert "pid" not in (tmp_path / "st" / "stack.json").read_text()
    finally:
        holder.close()
    text = (ROOT / "infra" / "local" / "stack.py").read_text()
    assert "-master.telemetry=false" in text and '"MLFLOW_DISABLE_TELEMETRY": "true"' in text


def test_the_stacks_mlflow_server_gets_a_pool_that_holds_64_trials():
    """MLflow-on-SQLite's default pool (5 + 10) ran out under 64 concurrent trials (issue 28); the local stack's
    server starts with 32 + 64, through the variables MLflow itself reads, unless the caller sets its own."""
    import importlib.util

    from mlflow.environment_variables import (
        MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW,
        MLFLOW_SQLALCHEMYSTORE_POOL_SIZE,
    )

    spec = importlib.util.spec_from_file_location("stack_mod", ROOT / "infra" / "local" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    env = stack.mlflow_server_env({"PATH": "/bin", "MLFLOW_TRACKING_URI": "http://elsewhere"})
    assert int(env[MLFLOW_SQLALCHEMYSTORE_POOL_SIZE.name]) >= 32
    assert int(env[MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW.name]) >= 64
    assert "MLFLOW_TRACKING_URI" not in env and env["PATH"] == "/bin"
    own = stack.mlflow_server_env({MLFLOW_SQLALCHEMYSTORE_POOL_SIZE.name: "8"})
    assert own[MLFLOW_SQLALCHEMYSTORE_POOL_SIZE.name] == "8"
