"""hkd_core is plain PyTorch: it never imports the orchestration libraries."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"ray", "mlflow", "hydra", "omegaconf", "boto3", "botocore"}
PKG = Path(__file__).resolve().parents[2] / "hkd_core"


def test_no_forbidden_imports_in_source():
    bad = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_importing_every_module_loads_none_of_them():
    mods = sorted(f"hkd_core.{p.stem}" for p in PKG.glob("*.py") if p.stem != "__main__")
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert out.strip() == "[]", out
