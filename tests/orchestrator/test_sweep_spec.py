"""Sweep YAMLs: the schema, its errors (before anything runs), and the define-by-run space."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from orchestrator.config import compose, from_composed
from orchestrator.sweep.spec import (
    SweepError,
    check_against_config,
    define_by_run,
    load,
    overrides_for,
    parse,
)

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
name: t
base: [experiment=smoke]
space:
  model.levels: {values: [1, 2, 3]}
  model.subspace_dims: {per_level: {values: [2, 4, 8]}}
  model.operator: {per_level: {values: [position, shared]}}
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smoke", "scale_count", "subspace_dims"])
def test_shipped_sweeps_are_valid(name):
    spec = load(ROOT / "sweeps" / f"{name}.yaml")
    check_against_config(spec, compose)


@pytest.mark.slow
def test_every_sampled_config_is_valid_and_dims_follow_levels():
    spec = parse(GOOD)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    fn = define_by_run(spec, 2)
    seen = set()
    for _ in range(40):
        t = study.ask()
        p = fn(t)
        study.tell(t, 0.0)
        L = p["model.levels"]
        seen.add(L)
        assert len(p["model.subspace_dims"]) == L and all(d % 2 == 0 for d in p["model.subspace_dims"])
        assert len(p["model.operator"]) == L
        cfg = from_composed(compose(spec.base + overrides_for(p))).run.hkd_config()
        assert cfg.levels == L and cfg.subspace_dims == p["model.subspace_dims"]
    assert seen == {1, 2, 3}


BAD = [
    ("name: x\nbase: []\nspace: {train.lr: {uniform: [0.1, 0.2]}}\nschedulr: {}\n", "schedulr: unknown key"),
    ("name: x\nbase: []\nspace: {}\n", "space: is empty"),
    ("name: x\nbase: []\n", "space: missing"),
    (
        "name: x\nspace: {train.lr: {uniform: [0.3, 0.1]}}\n",
        r"space.train.lr: uniform range \[0.3, 0.1\] is empty",
    ),
    ("name: x\nspace: {train.lr: {loguniform: [0, 0.1]}}\n", "loguniform needs lo > 0"),
    ("name: x\nspace: {train.lr: {normal: [0, 1]}}\n", "space.train.lr: must be one of"),
    ("name: x\nspace: {train.lr: {values: []}}\n", "values must be a non-empty list"),
    ("name: x\nspace: {model.subspace_dims: {per_level: {values: [4, 5]}}}\n", "must be even integers >= 2"),
    ("name: x\nspace: {train.lr: {per_level: {values: [1]}}}\n", "per_level applies to model.subspace_dims"),
    ("name: x\nspace: {model.levels: {values: [1, 2]}}\n", "needs model.subspace_dims with per_level"),
    (
        "name: x\nspace: {train.lr: {uniform: [0.1, 0.2]}}\nmetric: eval/acc\n",
        "metric: 'eval/acc' is not reported",
    ),
    ("name: x\nspace: {train.lr: {uniform: [0.1, 0.2]}}\nscheduler: {type: hyperband}\n", "scheduler.type"),
    (
        "name: x\nspace: {train.lr: {uniform: [0.1, 0.2]}}\nscheduler: {grace: 1}\n",
        "scheduler.grace: unknown key",
    ),
    ("name: x\nspace: {train.lr: {uniform: [0.1, 0.2]}}\ntrials: 0\n", "trials: must be an integer >= 1"),
    ("name: x y\nspace: {train.lr: {uniform: [0.1, 0.2]}}\n", "name: must be letters"),
    ("name: x\nspace: {lr: {uniform: [0.1, 0.2]}}\n", "space.lr: keys are dotted config keys"),
    ("name: [x\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, msg", BAD)
def test_malformed_sweeps_name_the_key(text, msg):
    with pytest.raises(SweepError, match=msg):
        parse(text, "bad.yaml")


def test_space_keys_must_exist_in_the_config():
    spec = parse("name: x\nbase: [experiment=smoke]\nspace: {train.lrr: {uniform: [0.1, 0.2]}}\n", "bad.yaml")
    with pytest.raises(
        SweepError, match="bad.yaml: space.train.lrr: is not a key of the composed base config"
    ):
        check_against_config(spec, compose)


@pytest.mark.slow
def test_hkd_sweep_refuses_a_malformed_file_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: [experiment=smoke]\nspace: {train.lr: {uniform: [0.3, 0.1]}}\n")
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        timeout=300,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip().splitlines()[-1]
        == f"hkd: sweep error: {bad}: space.train.lr: uniform range [0.3, 0.1] is empty: lo must be < hi"
    )
    # refused before anything runs: no Ray, and no MLflow call (the tracking URI above answers nothing)
    assert "Ray" not in r.stderr and "tracking server unreachable" not in r.stderr


def test_every_mistake_of_a_file_is_reported_at_once(tmp_path):
    """Four mistakes in the file and a space key the config lacks: one error lists all five, so a user fixes
    them in one go instead of one run per mistake; a file with one mistake keeps the one-line form."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nbase: [experiment=smoke]\nmode: maxx\ntrials: 0\nspace:\n"
        "  train.lr: {uniform: [0.3, 0.1]}\n  model.nope: {values: [1, 2]}\n  train.batch_size: {int: [1, 2.5]}\n"
    )
    with pytest.raises(SweepError) as e:
        load(bad, compose)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{bad}: 5 mistakes:"
    assert sorted(lines[1:]) == sorted(
        [
            "  space.train.lr: uniform range [0.3, 0.1] is empty: lo must be < hi",
            "  space.train.batch_size: int needs integer bounds, got [1, 2.5]",
            "  mode: must be min or max, got 'maxx'",
            "  trials: must be an integer >= 1, got 0",
            "  space.model.nope: is not a key of the composed base config",
        ]
    )
    one = tmp_path / "one.yaml"
    one.write_text("name: x\nbase: [experiment=smoke]\nspace: {train.lr: {uniform: [0.3, 0.1]}}\n")
    with pytest.raises(SweepError, match=r"^.*one.yaml: space.train.lr: uniform range \[0.3, 0.1\] is empty"):
        load(one, compose)
