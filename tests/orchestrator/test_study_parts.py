"""A study in parts and its figures: parts merge into one table in the study's row order, the curves' teacher
line is the teacher at the curves' N, and bars far past the models' scale are cut and marked
(orchestrator/analysis/study_parts.py, study_figures.py)."""

import json

import pytest

from hkd_core import metric_names as M
from orchestrator.analysis.study import variant_configs


def _part(tmp_path, name: str, variants: dict, teacher: dict, overrides=("experiment=smoke",), **extra):
    from orchestrator.analysis.study import part_fields

    _, cfgs = variant_configs(list(overrides), ["hkd"])
    folder = tmp_path / name
    folder.mkdir()
    row = {"fid": 100.0, "kid": 0.1, "kid_std": 0.01, "n": 32, "kimg": 0.256, "train_s": 9.0, "params": 1234}
    part = {
        "study": f"hkd-study-{name}",
        "variants": {v: {**row, "label": f"row {v}", "fid": fid} for v, fid in variants.items()},
        "teacher": {str(k): {"fid": f, "kid": 0.05, "n": 32} for k, f in teacher.items()},
        "wall_s": 60.0,
        "curve_n": 0,
        **part_fields(list(overrides), cfgs),
        **extra,
    }
    (folder / "study.json").write_text(json.dumps(part))
    return folder


def test_parts_of_one_study_merge_into_one_table(tmp_path):
    from orchestrator.analysis.study_parts import merge_study

    a = _part(tmp_path, "a", {"hkd": 101.0, "kd": 120.0}, {1: 300.0, 11: 50.0})
    b = _part(tmp_path, "b", {"kdm": 130.0}, {11: 50.0}, floor={"fid": 20.5, "kid": 0.001, "n": 32})
    r = merge_study([a, b], tmp_path / "merged")
    assert list(r["variants"]) == ["hkd", "kd", "kdm"] and sorted(r["teacher"]) == [1, 11]
    assert r["wall_s"] == 120.0 and r["parts"] == ["hkd-study-a", "hkd-study-b"]
    md = (tmp_path / "merged" / "study.md").read_text()
    assert (
        "| row hkd | 1 | 100.0 ± 10.0 | 2.00 | 101.00 | 2.02 |" in md
        and "| row kdm | 1 | 100.0 ± 10.0 | 2.00 | 130.00 |" in md
    )
    assert r["floor"]["fid"] == 20.5 and "Floor at N = 32: FID 20.50" in md  # from the part that measured it
    assert "Heun) | 1 | 50.0 | 1.00 | 300.00 | 6.00 |" in md and "hkd-study-a, hkd-study-b" in md
    written = json.loads((tmp_path / "merged" / "study.json").read_text())
    assert written["variants"]["kd"]["fid"] == 120.0
    assert all(set(t) == {"fid", "kid", "n"} for t in written["teacher"].values())  # no bookkeeping
    assert (tmp_path / "merged" / "study_fid.png").stat().st_size > 0


def test_parts_of_different_studies_or_overlapping_parts_are_refused(tmp_path):
    from orchestrator.analysis.study_parts import StudyMergeError, merge_study

    a = _part(tmp_path, "a", {"hkd": 101.0}, {11: 50.0})
    other = _part(tmp_path, "o", {"kd": 120.0}, {}, overrides=("experiment=smoke", "train.total_kimg=0.5"))
    with pytest.raises(StudyMergeError, match=r"differ in overrides"):
        merge_study([a, other], tmp_path / "m1")
    twice = _part(tmp_path, "t", {"hkd": 99.0}, {})
    with pytest.raises(StudyMergeError, match=r"variant hkd is in .*t/study.json and in an earlier part"):
        merge_study([a, twice], tmp_path / "m2")
    disagree = _part(tmp_path, "d", {"kd": 120.0}, {11: 51.0})
    with pytest.raises(
        StudyMergeError,
        match=r"teacher at NFE 11 scores FID 51.0 in .*d/study.json and 50.0 in .*a/study.json",
    ):
        merge_study([a, disagree], tmp_path / "m3")
    with pytest.raises(StudyMergeError, match=r"nowhere/study.json does not exist"):
        merge_study([a, tmp_path / "nowhere"], tmp_path / "m4")
    old = tmp_path / "old"
    old.mkdir()
    (old / "study.json").write_text(json.dumps({"study": "s", "variants": {}, "teacher": {}}))
    with pytest.raises(StudyMergeError, match=r"lacks overrides, shared_stages, n: it was written before"):
        merge_study([a, old], tmp_path / "m5")
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3", "m4", "m5"))


def test_a_part_can_leave_the_teacher_to_another():
    _, cfgs = variant_configs(["experiment=smoke"], ["kd", "hkd"], teacher_nfe=[])
    assert all(pc.run.eval.teacher_nfe == [] for pc, _ in cfgs.values())


def test_hkd_study_merge_on_the_command_line(tmp_path, capsys):
    from orchestrator.cli import main

    a = _part(tmp_path, "a", {"hkd": 101.0}, {11: 50.0})
    b = _part(tmp_path, "b", {"kd": 120.0}, {})
    assert main(["study", "--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert (
        "| row kd | 1 | 100.0 ± 10.0 | 2.00 | 120.00 | 2.40 |" in out and f"{tmp_path / 'm'}/study.md" in out
    )
    assert main(["study", "--merge", str(a), str(b)]) == 2
    assert "--merge needs --out" in capsys.readouterr().err
    assert main(["study", "--merge", str(a), str(a), "--out", str(tmp_path / "m2")]) == 2
    assert "variant hkd is in" in capsys.readouterr().err


def test_a_part_stopped_after_a_variant_keeps_that_variant_on_disk(tmp_path, monkeypatch):
    """A study writes its table and study.json after every variant, naming those not run yet: a part stopped in
    its second variant (a session's end) keeps the first, merges like any part, and its table says what is
    missing."""
    from orchestrator.analysis import study
    from orchestrator.analysis.study_parts import merge_study
    from orchestrator.stages import driver

    def stages(pc, last, progress):
        if pc.run.model.variant == "kdm":
            raise KeyboardInterrupt  # the part stopped in its second variant
        m = {M.FID: 90.0, M.KID: 0.04, M.KID_STD: 0.002, M.EVAL_N: 32, M.NOISE_FLOOR_FID: 20.5}
        m.update({M.teacher_fid(11): 45.0, M.teacher_kid(11): 0.02, M.teacher_kid_std(11): 0.001})
        m[M.EVAL_S] = 100.0
        dist = {"kimg": 0.256, "train_s": 9.0, "params": 1234, "curve": [], "wall_s": 20.0}
        return {
            "teacher": {"wall_s": 0.5},
            "trajectories": {"wall_s": 1000.0},
            "evaluate": {"metrics": m},
            "distill": dist,
            "_parent_run_id": "r",
            "_tracking_uri": "u",
            "_experiment_id": "e",
        }

    monkeypatch.setattr(driver, "run_stages", stages)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(["experiment=smoke"], ["hkd", "kdm"], [11], progress=False, out=tmp_path / "a")
    part = json.loads((tmp_path / "a" / "study.json").read_text())
    assert list(part["variants"]) == ["hkd"] and part["pending"] == ["kdm"] and part["floor"]["fid"] == 20.5
    assert part["teacher"]["11"]["kid_std"] == 0.001
    md = (tmp_path / "a" / "study.md").read_text()
    assert "| 1 | 40.0 ± 2.0 | 2.00 | 90.00 | 2.00 |" in md and "Not run yet: kdm" in md
    assert not (tmp_path / "a" / "study.json.tmp").exists()
    # the stages' own seconds, the shared ones once: 0.5 + 1000 + 20 + 100 s
    assert part["variants"]["hkd"]["stage_s"] == {"distill": 20.0, "evaluate": 100.0}
    assert "the stages' own time 18.7 min (the shared stages once)" in md
    b = _part(tmp_path, "b", {"kd": 120.0}, {11: 45.0})
    merged = merge_study([tmp_path / "a", b], tmp_path / "m")
    assert list(merged["variants"]) == ["hkd", "kd"] and merged["pending"] == ["kdm"]
    assert "Not run yet: kdm" in (tmp_path / "m" / "study.md").read_text()


def test_merged_and_multi_seed_rows_follow_the_study_order_whatever_the_parts_order(tmp_path):
    from orchestrator.analysis.study import study_order
    from orchestrator.analysis.study_parts import merge_study
    from orchestrator.analysis.study_seeds import combine_study_seeds

    assert study_order(["kdm", "mine", "no_tcons", "kd", "kdm"]) == ["no_tcons", "kd", "kdm", "mine"]
    a = _part(tmp_path, "a", {"kd": 120.0, "hkd": 101.0}, {11: 50.0})
    b = _part(tmp_path, "b", {"kdm": 130.0, "no_tcons": 99.0}, {})
    assert list(merge_study([b, a], tmp_path / "m")["variants"]) == ["no_tcons", "hkd", "kd", "kdm"]
    s1 = _part(tmp_path, "s1", {"kdm": 1.0, "hkd": 2.0}, {11: 50.0}, ("experiment=smoke", "train.seed=1"))
    assert list(combine_study_seeds([s1, a], tmp_path / "s")["variants"]) == ["hkd", "kd", "kdm"]


def test_the_curves_teacher_line_is_the_teacher_at_the_curves_n(tmp_path, caplog):
    """FID depends on N: curves at N = 1000 get the teacher's recorded score at N = 1000, not its row at the
    study's N = 10,000; without one the FID panels get no teacher line and the KID panels say why theirs serves."""
    from hkd_core.shipped import find_shipped
    from orchestrator.analysis.study import curve_teacher
    from orchestrator.analysis.study_figures import curve_reference
    from orchestrator.analysis.study_parts import merge_study
    from orchestrator.config import compose, from_composed

    over = ["experiment=study_fmnist", "eval.n=10000"]
    pc = from_composed(compose(over))
    record = find_shipped(pc.run.data, pc.run.teacher).record
    at_1000 = next(e for e in record["evals"] if e["n"] == 1000 and e["seed"] == pc.run.eval.seed)["by_nfe"][
        "35"
    ]
    line = curve_teacher(over, 1000, 10000, 35)
    assert line == {
        "fid": at_1000["fid"],
        "kid": at_1000["kid"],
        "kid_std": at_1000["kid_std"],
        "nfe": 35,
        "n": 1000,
    }
    assert curve_teacher([*over, "eval.seed=5"], 1000, 10000, 35) is None  # not measured on the curves' seeds
    caplog.set_level("WARNING")
    assert curve_teacher([*over, "eval.inception_weights=/nowhere/w.pth"], 1000, 10000, 35) is None
    assert (
        "no teacher line at the curves' N = 1000 (Inception weights /nowhere/w.pth not found" in caplog.text
    )
    assert curve_teacher(over, 10000, 10000, 35) is None and curve_teacher(over, 1000, 10000, 7) is None
    parts = [
        _part(tmp_path, p, {v: 60.0}, {35: 22.3}, tuple(over), curve_n=1000)
        for p, v in (("a", "kd"), ("b", "hkd"))
    ]
    assert merge_study(parts, tmp_path / "m")["teacher_curve"] == line
    r = {"curve_n": 1000, "teacher": {35: {"fid": 22.3, "kid": 0.0141, "n": 10000}}}
    assert curve_reference(r, "fid") is None
    assert curve_reference(r, "kid") == (0.0141, "teacher, 35 NFE (N = 10000; KID is unbiased in N)")
    assert curve_reference({**r, "teacher_curve": line}, "fid") == (
        at_1000["fid"],
        "teacher, 35 NFE (N = 1000)",
    )
    assert curve_reference({**r, "curve_n": 10000}, "fid") == (22.3, "teacher, 35 NFE (N = 10000)")


def test_bars_past_the_models_scale_are_cut_and_marked():
    from hkd_core.figures import plt
    from orchestrator.analysis.study_figures import axis_limit, clipped_barh

    assert axis_limit([50.0, 14.0], [50.0, 14.0, 331.6]) == pytest.approx(65.0)
    assert axis_limit([50.0, 14.0], [50.0, 14.0, 60.0]) is None  # everything fits: no cut
    fig, ax = plt.subplots()
    clipped_barh(ax, [50.0, 331.6, 14.0], ["b", "g", "g"], [2.0, 3.0, 1.0], limit=65.0)
    assert [round(p.get_width(), 1) for p in ax.patches] == [50.0, 65.0, 14.0]
    assert [t.get_text() for t in ax.texts] == [" 50.0", " 331.6 →", " 14.0"]
    plt.close(fig)
