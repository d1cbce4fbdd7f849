"""The toy-Tune module (test_sweep_tune.py: seeding, ASHA under both modes, concurrency) in an interpreter of its
own. Its in-process Ray must not share the suite's process: there a Ray core worker it left behind waited 60 s
for a GCS that was gone and aborted the interpreter at exit, after every test had passed. A child pytest starts
clean (no RAY_ADDRESS or service endpoints of the integration stack), and this test fails with the child's
report when any of its tests fails or none ran."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = Path(__file__).with_name("test_sweep_tune.py")
ROOT = Path(__file__).resolve().parents[2]


def _expected() -> int:
    """The module's test count: each test function, a parametrized one once per value."""
    n = 0
    for node in ast.parse(MODULE.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            params = [
                d
                for d in node.decorator_list
                if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("parametrize")
            ]
            n += len(params[0].args[1].elts) if params else 1
    return n


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_the_toy_tune_module_passes_in_its_own_interpreter(tmp_path):
    if os.environ.get("HKD_TUNE_TOY"):
        pytest.skip("HKD_TUNE_TOY is set: the module runs in this process")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PYTEST_ADDOPTS")
    }
    env["HKD_TUNE_TOY"] = "1"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--timeout=300",
            f"--basetemp={tmp_path / 'child'}",
            str(MODULE),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=450,
    )
    report = (r.stdout[-6000:] + "\n" + r.stderr[-3000:]).strip()
    assert r.returncode == 0, report
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) == _expected() == 4, report
    assert not re.search(r"\d+ (failed|error|skipped)", r.stdout), report
