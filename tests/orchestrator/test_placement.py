"""Where the Train workers go: cluster.placement_strategy reaches Ray Train's ScalingConfig, a wrong value is
refused naming the key, and the worker group's nodes are reported in one readable line."""

import pytest

from hkd_core.config import ConfigError
from orchestrator.config import load
from orchestrator.stages.reporting import placement_line


def test_placement_strategy_reaches_the_scaling_config():
    from orchestrator.stages.trainer import make_trainer

    pc = load(["experiment=smoke", "storage=fs", "tracking=file", "cluster.placement_strategy=SPREAD"])
    t = make_trainer(pc, lambda cfg: None, {}, "placement")
    assert t.scaling_config.placement_strategy == "SPREAD"
    assert load(["experiment=smoke"]).cluster.placement_strategy == "PACK"


def test_an_unknown_strategy_is_refused_naming_the_key():
    with pytest.raises(
        ConfigError,
        match=r"cluster.placement_strategy='spread'; choose one of \['PACK', 'SPREAD', "
        r"'STRICT_SPREAD'\]",
    ):
        load(["experiment=smoke", "cluster.placement_strategy=spread"])


def test_placement_line_names_each_node_and_its_ranks():
    nodes = {
        "aaaa1111bbbb": {"ip": "127.0.0.2", "ranks": [0, 2]},
        "cccc2222dddd": {"ip": "127.0.0.3", "ranks": [1]},
    }
    assert placement_line(nodes) == (
        "3 workers on 2 nodes: 127.0.0.2 [aaaa1111] (ranks 0,2), 127.0.0.3 [cccc2222] (ranks 1)"
    )
    assert placement_line({"x" * 12: {"ip": "10.0.0.1", "ranks": [0]}}).startswith("1 worker on 1 node: ")


def test_the_eta_counts_down_to_whichever_budget_ends_first():
    """A teacher screened for 1,500 s with total_kimg 1e6 showed an ETA of 14 million seconds: with
    max_train_s set, the ETA is the seconds left of that budget when it ends first."""
    from hkd_core import metric_names as M
    from orchestrator.stages.reporting import eta_s

    m = {M.SAMPLES_PER_S: 100.0, M.TRAIN_S: 400.0}
    assert eta_s(m, 10.0, 1e6) == pytest.approx((1e6 - 10.0) * 1000 / 100.0)  # no seconds budget: kimg
    assert eta_s(m, 10.0, 1e6, max_train_s=1500.0) == pytest.approx(1100.0)  # the seconds end first
    assert eta_s(m, 10.0, 50.0, max_train_s=1500.0) == pytest.approx(400.0)  # the kimg end first
    assert eta_s({M.TRAIN_S: 1600.0}, 10.0, 50.0, max_train_s=1500.0) == 0.0  # no rate yet, budget spent
