"""The sweep's verdict: which trial is best, whatever order Tune hands the results in and whatever NaN they hold."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

from orchestrator.sweep.results import summarize_sweep, to_markdown
from orchestrator.sweep.spec import parse

SPACE = "space: {train.lr: {uniform: [0.001, 0.01]}}\n"


def _result(trial: str, metric: float | None, final: bool = True, lr: float = 0.005, error=None):
    m = {"trial_id": trial, "kimg": 1.0, "final": final, "eval/fid": metric, "eval/mse_vs_teacher": 0.1}
    return SimpleNamespace(metrics=m, config={"train.lr": lr}, error=error, path=f"/tune/{trial}")


def _summary(mode: str, results):
    spec = parse(f"name: s\nmetric: eval/fid\nmode: {mode}\n{SPACE}")
    return summarize_sweep(spec, "s", results, 1.0, None)


def test_the_best_trial_does_not_depend_on_the_order_of_the_results_or_on_nan():
    results = [
        _result("a", 50.0),
        _result("b", float("nan")),
        _result("c", 40.0),
        _result("d", 40.0),
        _result("e", 30.0, final=False),
        _result("f", float("inf")),
    ]
    seen = set()
    for perm in itertools.permutations(results):
        s = _summary("min", list(perm))
        seen.add(tuple(r["trial_id"] for r in s["ranked"]))
        assert s["best"]["trial_id"] == "c"  # 40 (tie with d broken by trial id), never the NaN row
    assert seen == {("c", "d", "a")}  # one ranking for all 720 orders
    rows = {r["trial_id"]: r["status"] for r in s["rows"]}
    assert rows["b"] == rows["f"] == "completed, eval/fid not finite"
    assert rows["e"] == "stopped early (ASHA)"  # a stopped trial's lower value never wins
    assert "| - | b | completed, eval/fid not finite |" in to_markdown(s)


def test_mode_max_ranks_the_largest_first():
    s = _summary("max", [_result("a", 1.0), _result("b", 3.0), _result("c", float("nan")), _result("d", 2.0)])
    assert [r["trial_id"] for r in s["ranked"]] == ["b", "d", "a"] and s["best"]["trial_id"] == "b"
    assert all(math.isfinite(r["metric"]) for r in s["ranked"])
