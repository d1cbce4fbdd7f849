"""The tree shows the architecture and keeps it: every module is in docs/layout.md, imports go downwards through the
rooms of orchestrator/ (cli -> api -> sweep -> analysis -> stages -> services), nothing imports a module that imports it
back, and no source file grows past MAX_LINES. Static (ast), so it runs in milliseconds and imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 400
# a module may import modules of its own rank or lower; hkd_core imports nothing of orchestrator
RANK = {"hkd_core": 0, "services": 1, "top": 1, "stages": 2, "analysis": 3, "sweep": 4, "api": 5, "cli": 6}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("orchestrator", "hkd_core"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT)
            if "conf" in rel.parts or "shipped" in rel.parts[1:-1]:
                continue
            name = ".".join(rel.with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (lazy imports count: a circle through a function
    is still a circle), leaving out ``if TYPE_CHECKING:`` blocks (annotations, never run)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                base = pkg
                for _ in range(max(child.level - 1, 0)):
                    base = base.rpartition(".")[0]
                mod = (
                    (base + ("." + child.module if child.module else ""))
                    if child.level
                    else (child.module or "")
                )
                cands = [mod] + [f"{mod}.{a.name}" for a in child.names]
            elif isinstance(child, ast.Import):
                cands = [a.name for a in child.names]
            else:
                visit(child)
                continue
            # a package whose __init__ only documents its room is not a dependency
            found.update(
                c
                for c in cands
                if c in known
                and c != name
                and not c.endswith(("orchestrator", "hkd_core"))
                and known[c].name != "__init__.py"
            )

    visit(ast.parse(path.read_text()))
    return found


def room(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "hkd_core":
        return "hkd_core"
    if len(parts) > 2 or parts[1] in RANK:  # a module of a room, or the room's own __init__
        return parts[1]
    return {"__main__": "cli", "api": "api"}.get(parts[-1], "top")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: imports(n, p, known) for n, p in known.items()}


def test_every_module_is_in_the_layout_doc():
    doc = (ROOT / "docs" / "layout.md").read_text()
    missing = [
        str(p.relative_to(ROOT))
        for n, p in modules().items()
        if p.name != "__init__.py" and f"`{p.relative_to(ROOT)}`" not in doc
    ]
    assert not missing, (
        f"docs/layout.md does not name {missing}: add each to its 'File -> what it owns' table"
    )


def test_imports_go_downwards_through_the_rooms(graph):
    up = [
        f"{a} ({room(a)}) imports {b} ({room(b)})"
        for a, deps in graph.items()
        for b in deps
        if RANK[room(b)] > RANK[room(a)]
    ]
    assert not up, (
        "imports against the layering (cli -> api -> sweep -> analysis -> stages -> services):\n"
        + "\n".join(up)
    )


def test_no_import_circle(graph):
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            x = todo.pop()
            if x == goal:
                return True
            if x not in seen:
                seen.add(x)
                todo.extend(graph.get(x, ()))
        return False

    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if reaches(b, a)})
    assert not circles, f"modules that import each other (directly or through others): {circles}"


def test_the_checks_see_what_they_guard(tmp_path):
    """The graph finds a lazy import and a relative one, and skips TYPE_CHECKING blocks (else the tests above
    could pass by seeing nothing)."""
    pkg = tmp_path / "orchestrator" / "stages"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from orchestrator.sweep import run\n"
        "def f():\n    from ..cli import commands\n    from . import y\n"
    )
    known = {
        "orchestrator.stages.x": src,
        "orchestrator.cli.commands": src,
        "orchestrator.stages.y": src,
        "orchestrator.sweep.run": src,
    }
    assert imports("orchestrator.stages.x", src, known) == {
        "orchestrator.cli.commands",
        "orchestrator.stages.y",
    }
    assert room("orchestrator.stages.x") == "stages" and room("orchestrator.config") == "top"
    assert room("orchestrator.api") == "api" and room("orchestrator.__main__") == "cli"


def test_no_source_file_is_over_the_limit():
    files = [
        p
        for pkg in ("orchestrator", "hkd_core", "infra", "scripts", "benchmarks", "tests")
        for p in (ROOT / pkg).rglob("*.py")
    ]
    assert len(files) > 50
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by what they own): {long}"


def test_every_root_a_module_computes_is_the_checkout():
    """``Path(__file__).resolve().parents[k]`` must still mean the checkout after a module moves between rooms (a
    sweep that moved one level down once looked for .stack/ inside orchestrator/)."""
    import re

    seen = 0
    for p in [*ROOT.joinpath("orchestrator").rglob("*.py"), *ROOT.joinpath("hkd_core").rglob("*.py")]:
        for m in re.finditer(r"^ROOT = Path\(__file__\)\.resolve\(\)\.parents\[(\d)\]", p.read_text(), re.M):
            seen += 1
            assert p.resolve().parents[int(m.group(1))] == ROOT, (
                f"{p.relative_to(ROOT)}: ROOT is not the checkout"
            )
    assert seen >= 3


def _unreachable(source: str) -> list[str]:
    """Statements a function can never reach: anything after a return or raise in the same block."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for st, nxt in zip(block, block[1:]):
                if isinstance(st, (ast.Return, ast.Raise)):
                    found.append(
                        f"line {nxt.lineno} after the {type(st).__name__.lower()} on line {st.lineno}"
                    )
                    break
    return found


def test_no_code_after_a_return():
    """A method moved in a refactor once sat, unreachable, after a function's return (Tune never called it);
    nothing in the packages may follow a return or raise in its block."""
    assert _unreachable("def f():\n    return 1\n\n    def g(self):\n        pass\n") == [
        "line 4 after the return on line 2"
    ]
    bad = {
        str(p.relative_to(ROOT)): u
        for pkg in ("orchestrator", "hkd_core", "infra")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if (u := _unreachable(p.read_text()))
    }
    assert bad == {}


def test_the_storage_and_tracking_clients_import_no_torch():
    """A process that only moves bytes and metrics (a load test's trial, a sweep's bookkeeping) must not pay for
    torch: 0.3 GB a process, which put 64 concurrent trials out of this machine's memory (issue 28). Checked in a
    child interpreter, whose imports are its own."""
    import subprocess
    import sys

    code = (
        "import sys; import orchestrator.services.storage, orchestrator.services.tracking; "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stdout + r.stderr
