"""A Ray that the driver starts in its own process binds 127.0.0.1, never the machine's network address: Ray
reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at its first import, so the driver must set it before any stage
imports Ray (the trajectories stage once imported it first, and its in-process Ray took 192.0.2.x)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# a child interpreter that runs `hkd trajectories` and, at Ray's first import, prints the variable and stops
PROBE = textwrap.dedent(
    """
    import os, sys
    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name == "ray":
                print("AT RAY IMPORT:", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), flush=True)
                os._exit(0)
    sys.meta_path.insert(0, Probe())
    from orchestrator.cli import main
    main(sys.argv[1:])
    print("RAY NEVER IMPORTED", flush=True)
    """
)


def test_the_driver_sets_loopback_before_a_stage_imports_ray(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")
    }
    env["HKD_STACK_DIR"] = str(tmp_path / "no-stack")  # no local stack to adopt: Ray in this process
    args = [
        "trajectories",
        "experiment=smoke",
        "storage=fs",
        "tracking=file",
        f"storage.root={tmp_path}/store",
        f"tracking.root={tmp_path}/mlflow",
        "cluster.address=null",
        "--no-progress",
    ]
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert "AT RAY IMPORT: 0" in r.stdout, (r.stdout + r.stderr)[-3000:]
