"""The quality study's plan: every variant shares the teacher trajectories, differs where declared, and the
teacher is scored once."""
import pytest

from orchestrator.study import VARIANTS, parse_variants, to_markdown, variant_configs


def test_variants_share_the_trajectories_and_differ_where_declared():
    study, cfgs = variant_configs(["experiment=smoke"], list(VARIANTS), teacher_nfe=None)
    assert list(cfgs) == list(VARIANTS) and study.startswith("hkd-study-")
    hashes = {v: pc.stages() for v, (pc, _) in cfgs.items()}
    assert len({(h["teacher"], h["trajectories"]) for h in hashes.values()}) == 1     # one shared teacher + data
    assert len({h["distill"] for h in hashes.values()}) == len(VARIANTS)               # six different models
    run = {v: pc.run for v, (pc, _) in cfgs.items()}
    assert run["no_koopman"].model.variant == "no_koopman" and run["kd"].model.variant == "kd"
    assert run["no_tcons"].train.states_per_traj == 1 and run["hkd"].train.states_per_traj > 1
    assert len({r.train.total_kimg for r in run.values()}) == 1                         # the same budget
    # the teacher at NFE 1, 2, 4 and its full NFE (smoke: Heun 6 steps = 11), scored once
    assert run["hkd"].eval.teacher_nfe == [1, 2, 4, 11]
    assert all(r.eval.teacher_nfe == [] for v, r in run.items() if v != "hkd")
    assert all(pc.tracking.tags["hkd.study"] == study for pc, _ in cfgs.values())
    assert len({pc.name for pc, _ in cfgs.values()}) == len(VARIANTS)                 # distinct MLflow runs


def test_study_id_follows_its_inputs_and_bad_variants_are_named():
    a, _ = variant_configs(["experiment=smoke"], ["hkd", "kd"])
    b, _ = variant_configs(["experiment=smoke"], ["hkd", "kd"])
    c, _ = variant_configs(["experiment=smoke", "train.total_kimg=0.5"], ["hkd", "kd"])
    assert a == b != c
    with pytest.raises(ValueError, match=r"unknown \['vae'\]"):
        parse_variants("hkd,vae")
    assert parse_variants(None) == list(VARIANTS)


def test_markdown_table_has_a_row_per_model_and_teacher_nfe():
    _, cfgs = variant_configs(["experiment=smoke"], ["hkd", "kd"])
    pc = cfgs["hkd"][0]
    r = {"study": "s", "wall_s": 60.0,
         "variants": {"hkd": {"label": "HKD (full)", "fid": 100.0, "kid": 0.1, "n": 32, "kimg": 0.256,
                              "train_s": 9.0, "params": 1234},
                      "kd": {"label": "KD", "fid": 120.0, "kid": 0.12, "n": 32, "kimg": 0.256, "train_s": 5.0,
                             "params": 999}},
         "teacher": {1: {"fid": 300.0, "kid": 0.3, "n": 32}, 11: {"fid": 50.0, "kid": 0.05, "n": 32}}}
    md = to_markdown(r, pc)
    assert "| HKD (full) | 1 | 100.00 | 0.1000 |" in md and "| KD | 1 | 120.00 |" in md
    assert "Heun) | 11 | 50.00 |" in md and "N = 32" in md
