"""hkd study --seeds: one study at several train.seed values in one table (orchestrator/analysis/study_seeds.py)."""

import json
import math

import pytest

from orchestrator.analysis.study import variant_configs


def _study(tmp_path, name: str, variants: dict, teacher: dict, overrides=("experiment=smoke",), **extra):
    """A study folder as `hkd study --out` writes it: variants {name: (kid, fid)}, teacher {nfe: fid}."""
    from orchestrator.analysis.study import part_fields

    _, cfgs = variant_configs(list(overrides), ["hkd"])
    folder = tmp_path / name
    folder.mkdir()
    row = {"kid_std": 0.002, "n": 32, "kimg": 0.256, "train_s": 9.0, "params": 1234}
    part = {
        "study": f"hkd-study-{name}",
        "variants": {v: {**row, "label": f"row {v}", "kid": k, "fid": f} for v, (k, f) in variants.items()},
        "teacher": {str(n): {"fid": f, "kid": 0.01, "kid_std": 0.001, "n": 32} for n, f in teacher.items()},
        "wall_s": 60.0,
        "curve_n": 0,
        **part_fields(list(overrides), cfgs),
        **extra,
    }
    (folder / "study.json").write_text(json.dumps(part))
    return folder


def test_seeds_combine_into_means_spreads_and_ratios_of_the_means(tmp_path):
    from orchestrator.analysis.study_seeds import combine_study_seeds

    s0 = _study(tmp_path, "s0", {"hkd": (0.030, 40.0), "kd": (0.050, 60.0)}, {1: 300.0, 11: 20.0})
    s1 = _study(
        tmp_path,
        "s1",
        {"hkd": (0.034, 44.0)},
        {11: 20.0},
        overrides=("experiment=smoke", "train.seed=1"),
        floor={"fid": 2.5, "kid": 0.0, "n": 32},
    )
    r = combine_study_seeds([s0, s1], tmp_path / "seeds")
    assert r["seeds"] == [0, 1] and r["overrides"] == ["experiment=smoke"]
    hkd = r["variants"]["hkd"]
    assert hkd["kid"] == pytest.approx(0.032) and hkd["fid"] == pytest.approx(42.0)
    assert hkd["kid_spread"] == pytest.approx(0.004 / math.sqrt(2)) and hkd["fid_spread"] == pytest.approx(
        4 / math.sqrt(2)
    )
    assert (hkd["kid_ratio"], hkd["fid_ratio"]) == ("3.20", "2.10")  # the means over the teacher at NFE 11
    assert r["variants"]["kd"]["missing_seeds"] == [1] and r["variants"]["kd"]["kid_spread"] is None
    md = (tmp_path / "seeds" / "seeds.md").read_text()
    assert "| row hkd | 32.0 ± 2.8 | 30.0 / 34.0 | 2.0 | 3.20 | 42.0 ± 2.8 | 40.0 / 44.0 | 2.10 |" in md
    assert "| row kd | 50.0 (one seed) | 50.0 / - |" in md and "kd (seed 1)" in md
    assert "| teacher, 11 NFE | 10.0 | - | 1.0 | 1.00 | 20.00 |" in md and "FID 2.50" in md
    assert (
        json.loads((tmp_path / "seeds" / "seeds.json").read_text())["variants"]["hkd"]["seeds"]["1"]["fid"]
        == 44.0
    )
    assert (tmp_path / "seeds" / "seeds.png").stat().st_size > 0


def test_only_one_study_at_distinct_seeds_combines(tmp_path):
    from orchestrator.analysis.study_parts import StudyMergeError
    from orchestrator.analysis.study_seeds import combine_study_seeds

    s0 = _study(tmp_path, "s0", {"hkd": (0.03, 40.0)}, {11: 20.0})
    other = _study(
        tmp_path, "o", {"hkd": (0.03, 40.0)}, {}, overrides=("experiment=smoke", "train.total_kimg=0.5")
    )
    with pytest.raises(StudyMergeError, match=r"differ in their overrides other than train.seed"):
        combine_study_seeds([s0, other], tmp_path / "x1")
    same = _study(tmp_path, "same", {"kd": (0.05, 60.0)}, {}, overrides=("experiment=smoke", "train.seed=0"))
    with pytest.raises(StudyMergeError, match=r"both ran at train.seed=0; give one folder per seed"):
        combine_study_seeds([s0, same], tmp_path / "x2")
    disagree = _study(
        tmp_path, "d", {"hkd": (0.03, 40.0)}, {11: 21.0}, overrides=("experiment=smoke", "train.seed=1")
    )
    with pytest.raises(
        StudyMergeError,
        match=r"teacher at NFE 11 scores FID 21.0 in .*d/study.json and 20.0 in .*s0/study.json; the teacher does "
        r"not depend on the student's seed",
    ):
        combine_study_seeds([s0, disagree], tmp_path / "x3")
    with pytest.raises(StudyMergeError, match=r"hkd study --seeds: .*nowhere/study.json does not exist"):
        combine_study_seeds([s0, tmp_path / "nowhere"], tmp_path / "x4")
    assert not any((tmp_path / x).exists() for x in ("x1", "x2", "x3", "x4"))


def test_hkd_study_seeds_on_the_command_line(tmp_path, capsys):
    from orchestrator.cli import main

    s0 = _study(tmp_path, "s0", {"hkd": (0.030, 40.0)}, {11: 20.0})
    s1 = _study(
        tmp_path, "s1", {"hkd": (0.034, 44.0)}, {11: 20.0}, overrides=("experiment=smoke", "train.seed=1")
    )
    assert main(["study", "--seeds", str(s0), str(s1), "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "| row hkd | 32.0 ± 2.8 | 30.0 / 34.0 |" in out and f"{tmp_path / 'x'}/seeds.md" in out
    assert main(["study", "--seeds", str(s0), str(s1)]) == 2
    assert "--seeds needs --out" in capsys.readouterr().err
    assert main(["study", "--seeds", str(s0), "--merge", str(s1), "--out", str(tmp_path / "y")]) == 2
    assert "not both" in capsys.readouterr().err


def test_each_seed_keeps_its_colour_and_legend_entry_whichever_rows_have_it(tmp_path):
    from orchestrator.analysis.study_seeds import combine_study_seeds, seed_points

    s0 = _study(tmp_path, "s0", {"hkd": (0.030, 40.0), "no_tcons": (0.031, 41.0)}, {11: 20.0})
    s1 = _study(
        tmp_path, "s1", {"kd": (0.05, 60.0), "hkd": (0.034, 44.0)}, {}, ("experiment=smoke", "train.seed=1")
    )
    r = combine_study_seeds([s0, s1], tmp_path / "seeds")
    assert list(r["variants"]) == ["no_tcons", "hkd", "kd"]  # the study's order: seed 1 lacks the first row
    pts = [(round(x, 1), round(y, 2), err, j, label) for x, y, err, j, label in seed_points(r, "kid", 1e3)]
    assert pts == [
        (31.0, -0.1, 2.0, 0, "seed 0"),
        (30.0, 0.9, 2.0, 0, None),
        (34.0, 1.1, 2.0, 1, "seed 1"),
        (50.0, 2.1, 2.0, 1, None),  # a row only seed 1 has: seed 1's colour, not the first one
    ]
    assert [err for *_, err, _, _ in seed_points(r, "fid", 1.0)] == [None] * 4
