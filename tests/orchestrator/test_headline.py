"""What the main job ends with: the KID ratio first, the FID ratio with the floor at that N, the other teacher
NFEs; and how a shipped teacher's record keeps evaluations at several N."""

from hkd_core import metric_names as M
from orchestrator.stages.headline import headline_lines
from orchestrator.stages.ship import merged_evals

METRICS = {
    M.FID: 71.68,
    M.KID: 0.0451,
    M.KID_STD: 0.0018,
    M.EVAL_N: 1000,
    M.teacher_fid(35): 41.5,
    M.teacher_kid(35): 0.0129,
    M.teacher_kid_std(35): 0.0009,
    M.teacher_fid(4): 91.98,
    M.teacher_kid(4): 0.0794,
    M.NOISE_FLOOR_FID: 22.62,
}


def test_the_final_lines_lead_with_the_kid_ratio_and_state_the_floor():
    lines = headline_lines(METRICS)
    assert lines[0] == "HKD at NFE 1 against the teacher at NFE 35 (N = 1000, the same noise seeds):"
    assert lines[1] == "  KID ratio 3.50   (KID x1e3 45.1 ± 1.8 against 12.9 ± 0.9)"
    assert (
        lines[2]
        == "  FID ratio 1.73   (FID 71.68 against 41.50; floor at N = 1000: 22.62, what real images score)"
    )
    assert lines[3] == "  teacher at NFE 4: FID 91.98, KID x1e3 79.4"


def test_without_a_teacher_the_line_has_no_ratio():
    m = {k: v for k, v in METRICS.items() if "teacher" not in k}
    assert headline_lines(m) == [
        "HKD at NFE 1, N = 1000: KID x1e3 45.1 ± 1.8   FID 71.68   (floor at N = 1000: "
        "22.62, what real images score)"
    ]
    assert "ratio" not in headline_lines({k: v for k, v in m.items() if k != M.NOISE_FLOOR_FID})[0]


def test_a_record_keeps_its_evaluations_at_other_n_and_replaces_the_same_one():
    ref = {"images_sha256": "a", "inception_sha256": "b"}
    e1000 = {"n": 1000, "seed": 123, "split": "test", "reference": ref, "by_nfe": {"35": {"fid": 41.5}}}
    e10k = {**e1000, "n": 10000, "by_nfe": {"35": {"fid": 30.0}}}
    assert merged_evals(None, e1000) == [e1000]
    record = {"evals": [e1000]}
    assert merged_evals(record, e10k) == [e1000, e10k]
    again = {**e1000, "by_nfe": {"35": {"fid": 41.4}}}
    assert merged_evals({"evals": [e1000, e10k]}, again) == [e10k, again]
    other_weights = {**e1000, "reference": {**ref, "inception_sha256": "c"}}
    assert merged_evals(record, other_weights) == [e1000, other_weights]


def test_scoring_a_shipped_teacher_at_more_nfe_keeps_the_nfe_scored_before():
    """The same identity at NFE 1 and 4 later: NFE 35 stays, under the command that measured it; an NFE measured
    again takes its new score; another N keeps nothing of this one."""
    ref = {"images_sha256": "a", "inception_sha256": "b"}
    e35 = {"n": 10000, "seed": 123, "split": "test", "reference": ref, "command": "ship 35", "git_sha": "x"}
    e35["by_nfe"] = {"35": {"fid": 22.3}, "4": {"fid": 60.0}}
    e1000 = {**e35, "n": 1000, "by_nfe": {"35": {"fid": 41.5}}}
    later = {
        **e35,
        "command": "ship 1,4",
        "git_sha": "y",
        "by_nfe": {"1": {"fid": 290.0}, "4": {"fid": 59.0}},
    }
    (kept1000, merged) = merged_evals({"evals": [e1000, e35]}, later)
    assert kept1000 == e1000
    assert merged["by_nfe"] == {"1": {"fid": 290.0}, "4": {"fid": 59.0}, "35": {"fid": 22.3}}
    assert merged["command"] == "ship 1,4"
    assert merged["kept"] == [{"nfe": ["35"], "command": "ship 35", "git_sha": "x"}]
    again = {**later, "command": "ship 2", "by_nfe": {"2": {"fid": 295.0}}}
    (_, twice) = merged_evals({"evals": [e1000, merged]}, again)
    assert set(twice["by_nfe"]) == {"1", "2", "4", "35"}
    assert [k["nfe"] for k in twice["kept"]] == [["35"], ["1", "4", "35"]]
    assert merged_evals({"evals": [e1000]}, {**later, "n": 50000})[1] == {**later, "n": 50000}


def test_no_kid_ratio_when_the_teachers_kid_is_within_its_std_of_zero():
    """At a small N the teacher's (unbiased) KID can be negative or within its std of 0: a ratio of it means
    nothing (the smoke job printed "KID ratio -148.96"), so the headline says n/a and gives the two KIDs."""
    from hkd_core import metric_names as M
    from orchestrator.stages.headline import headline_lines

    m = {
        M.EVAL_N: 32,
        M.KID: 0.5957,
        M.KID_STD: 0.0236,
        M.FID: 456.87,
        M.teacher_kid(11): -0.004,
        M.teacher_kid_std(11): 0.0054,
        M.teacher_fid(11): 142.02,
    }
    line = headline_lines(m)[1]
    assert line.startswith("  KID ratio n/a (the teacher's KID is within its std of 0") and "-148" not in line
    assert "KID x1e3 595.7 ± 23.6 against -4.0 ± 5.4" in line
