"""The real local stack for integration tests: SeaweedFS S3, an MLflow server and a Ray head, on 127.0.0.1
and free ports, in a temporary folder; started once per session and stopped at the end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "local" / "stack.py"


def _stack_module():
    spec = importlib.util.spec_from_file_location("hkd_local_stack", STACK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


free_ports = _stack_module().free_ports


def stack(*args: str, state: Path) -> str:
    r = subprocess.run(
        [sys.executable, str(STACK), *args, "--dir", str(state)], capture_output=True, text=True, timeout=300
    )
    if r.returncode:
        raise RuntimeError(f"stack {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """Starts the stack (with a Ray head of 6 logical CPUs: three 1-worker sweep trials at once) and exports
    its client environment."""
    state = tmp_path_factory.mktemp("stack")
    names = ["s3", "master", "volume", "filer", "mlflow", "ray", "dashboard", "agent", "client"]
    ports = dict(zip(names, free_ports(len(names))))
    flags = [f"--{k}-port={v}" for k, v in ports.items()]
    old = dict(os.environ)
    try:
        stack("start", "--ray", "--num-cpus=6", *flags, state=state)
        env = {}
        for line in stack("env", state=state).splitlines():
            k, v = line.removeprefix("export ").split("=", 1)
            env[k] = v
        os.environ.update(env)
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
        yield {"dir": state, "ports": ports, "env": env, "status": json.loads(stack("status", state=state))}
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        os.environ.clear()
        os.environ.update(old)
        stack("stop", state=state)


@pytest.fixture(scope="session")
def s3(local_stack):
    from orchestrator.services.storage import StorageConfig, make_client

    return make_client(StorageConfig(endpoint_url=local_stack["env"]["AWS_ENDPOINT_URL"]))


@pytest.fixture
def free_port():
    return lambda: free_ports(1)[0]


RUN_TAG = __import__("uuid").uuid4().hex[:6]
SMOKE = [
    "experiment=smoke",
    "cluster.num_workers=2",
    f"storage.prefix=it-{RUN_TAG}",
    f"tracking.experiment=it-{RUN_TAG}",
    f"name=smoke-{RUN_TAG}",
    "tracking.register_model=hkd-it",
    "tracking.system_metrics_s=1",
]


@pytest.fixture(scope="session")
def run_tag() -> str:
    """Unique per session: the S3 prefix, MLflow experiment and names of this session's runs."""
    return RUN_TAG


@pytest.fixture(scope="session")
def smoke() -> list[str]:
    """Hydra overrides of the smoke pipeline used across the integration tests."""
    return list(SMOKE)


@pytest.fixture(scope="session")
def first_pipeline(local_stack, tmp_path_factory):
    """The smoke pipeline, run once per session; other tests build on its finished stages."""
    import time

    from orchestrator.cli import main

    out = tmp_path_factory.mktemp("pipeline") / "res.json"
    t0 = time.perf_counter()
    assert main(["pipeline", *SMOKE, "--no-progress", "--json", str(out)]) == 0
    return json.loads(out.read_text()), time.perf_counter() - t0


def pytest_collection_modifyitems(config, items):
    """The secrets search runs last, over everything the other tests left behind."""
    items.sort(key=lambda item: "test_secrets.py" in item.nodeid)


FAULTS: list[dict] = []
MEASURED: list[str] = []


@pytest.fixture(scope="session")
def measured():
    """Lines a test wants in the run's summary (what a closing note quotes: where trials ran, how long)."""
    return MEASURED


@pytest.fixture(scope="session")
def fault_report():
    """Where the fault tests put what they injected and how long recovery took: printed at the end of the
    run (and written to $HKD_FAULT_REPORT as JSON, if set)."""
    return FAULTS


@pytest.fixture(scope="session")
def stack_service(local_stack):
    """stack_service("stop", "s3") stops one service of the test stack; stack_service("start") starts what
    is not running (on the same ports, with the same data). Returns the time it took."""
    import time

    def ctl(action: str, service: str | None = None) -> float:
        t0 = time.monotonic()
        if action == "stop":
            stack("stop", f"--service={service}", state=local_stack["dir"])
        else:
            stack("start", state=local_stack["dir"])
        return time.monotonic() - t0

    return ctl


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured by the integration tests")
        for line in MEASURED:
            terminalreporter.write_line(line)
    if not FAULTS:
        return
    terminalreporter.section("faults injected and recovery times")
    for f in FAULTS:
        terminalreporter.write_line(
            " | ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in f.items())
        )
    if os.environ.get("HKD_FAULT_REPORT"):
        Path(os.environ["HKD_FAULT_REPORT"]).write_text(json.dumps(FAULTS, indent=1))


@pytest.fixture(scope="session")
def job_command():
    """Builds the `ray job submit` command line of the tests (orchestrator.services.jobdir.submit_command): this
    checkout as the job's working dir, the job's environment variables if given, then the entrypoint. The caller
    sets RAY_ADDRESS."""
    from orchestrator.services.jobdir import submit_command

    def build(entrypoint: list[str], env_vars: dict | None = None) -> list[str]:
        return submit_command(entrypoint, ROOT, env_vars)

    return build
