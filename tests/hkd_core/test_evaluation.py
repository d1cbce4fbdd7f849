"""The one evaluation path: which noise an evaluation draws, and that chunking it changes nothing."""

import pytest
import torch

from hkd_core import evaluation as E
from hkd_core import metric_names as M
from hkd_core.config import DataConfig, EvalConfig
from hkd_core.edm import SIGMA_MAX


def test_eval_seeds_belong_to_eval_seed_and_prefix_each_other():
    e = EvalConfig(n=5, seed=3)
    assert E.eval_seeds(e) == [3_000_000 + i for i in range(5)]
    assert E.eval_seeds(e, 2) == E.eval_seeds(e)[:2]  # a sweep's small-N proxy: the first seeds
    assert not set(E.eval_seeds(EvalConfig(n=5, seed=4))) & set(E.eval_seeds(e))


def test_noise_is_a_function_of_the_seed_alone():
    x = E.noise([7, 8, 9], (1, 4, 4))
    assert torch.equal(E.noise([8], (1, 4, 4))[0], x[1])
    assert x.std() > 0.3 * SIGMA_MAX


def test_chunks_of_seeds_give_the_samples_of_the_whole(koopman_model):
    flat = lambda imgs: imgs.flatten(1)  # noqa: E731 - a stand-in feature extractor
    seeds = list(range(10))
    shape = (koopman_model.cfg.img_channels, koopman_model.cfg.resolution, koopman_model.cfg.resolution)
    gen = E.model_generator(koopman_model)
    whole = E.chunk_features(gen, seeds, shape, flat, batch_size=4)
    parts = [E.chunk_features(gen, seeds[i::3], shape, flat, batch_size=3) for i in range(3)]
    by_seed = {s: f for i, p in enumerate(parts) for s, f in zip(seeds[i::3], p)}
    assert torch.allclose(torch.stack([by_seed[s] for s in seeds]), whole, atol=1e-5)
    stats, feats = E.merge_chunks([E.chunk_result(p) for p in parts])
    assert stats.n == 10 and feats.shape == whole.shape


def test_scoring_in_process_equals_the_chunked_path(koopman_model):
    """score_in_process (the proxy's, a sweep trial's and the benchmarks' chain) gives the numbers of the Ray path:
    chunks of seeds scored apart, merged, scored: the same FID and KID to float precision."""
    from hkd_core.fid import FeatureStats, Reference

    feat = lambda imgs: imgs.flatten(1)[:, :16].double().float()  # noqa: E731 - a small stand-in extractor
    shape = (koopman_model.cfg.img_channels, koopman_model.cfg.resolution, koopman_model.cfg.resolution)
    gen = E.model_generator(koopman_model)
    ref_feats = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    ref = Reference({}, FeatureStats.of(ref_feats), ref_feats)
    seeds = list(range(24))
    one = E.score_in_process(gen, seeds, shape, feat, ref, kid_subset_size=8, batch_size=5)
    parts = [
        E.chunk_result(E.chunk_features(gen, seeds[i : i + 8], shape, feat, batch_size=3)) for i in (0, 8, 16)
    ]
    chunked = E.score(*E.merge_chunks(parts), ref, 8)
    assert one["fid"] == pytest.approx(chunked["fid"], rel=1e-6) and one["kid"] == pytest.approx(
        chunked["kid"]
    )
    assert one["fid"] > 0


def test_metric_names_of_model_and_teacher():
    s = {"fid": 12.5, "kid": 0.01, "kid_std": 0.002}
    assert E.model_metrics(s, 300) == {
        M.FID: 12.5,
        M.KID: 0.01,
        M.KID_STD: 0.002,
        M.EVAL_N: 300,
        M.FID_NFE1: 12.5,
    }
    assert E.teacher_metrics(s, 35) == {
        "eval/teacher_fid_nfe35": 12.5,
        "eval/teacher_kid_nfe35": 0.01,
        "eval/teacher_kid_std_nfe35": 0.002,
    }
    assert M.teacher_nfe_of("eval/teacher_fid_nfe35") == 35 and M.teacher_nfe_of(M.FID) is None


def test_reference_images_refuse_more_than_the_split_holds():
    x = E.reference_images(DataConfig(), "test", 16)
    assert x.shape == (16, 1, 32, 32)
    assert torch.equal(x, E.reference_images(DataConfig(), "test", 16))  # the same seeded subset each time
    with pytest.raises(ValueError, match="eval.n=20000: fashion_mnist/test has only 10000 images"):
        E.reference_images(DataConfig(), "test", 20000)


def test_holdout_error_is_zero_for_a_model_that_returns_the_teachers_endpoint(koopman_model):
    states = torch.randn(6, 3, 1, 8, 8)

    class TeacherLookup(torch.nn.Module):
        """x_T -> the teacher's x_0 of that trajectory: a perfect one-step student."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def sample(self, x_T):
            idx = [int((states[:, 0] - x).abs().flatten(1).sum(1).argmin()) for x in x_T]
            return states[idx, -1]

    assert E.holdout_error(TeacherLookup(), states, batch_size=4) == pytest.approx(0.0)
    assert E.holdout_error(koopman_model, states) > 0.1


@pytest.mark.slow
def test_kid_has_a_spread_even_when_the_subset_size_exceeds_n():
    from hkd_core.fid import FeatureStats, Reference

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 2048, generator=g), torch.randn(40, 2048, generator=g) + 0.1
    s = E.score(FeatureStats.of(a), a, Reference({}, FeatureStats.of(b), b), kid_subset_size=1000)
    assert s["kid_std"] > 0  # subsets of 20 of the 40: a std that says how noisy the KID is


def test_endpoint_sensitivity_tells_a_lookup_table_from_a_smooth_map(toy_images):
    from hkd_core.evaluation import endpoint_sensitivity, nearest
    from hkd_core.teachers import EmpiricalTeacher, GaussianTeacher

    x_T = torch.randn(64, *toy_images.shape[1:], generator=torch.Generator().manual_seed(0)) * 80
    idx, dist = nearest(toy_images[[3, 1]] + 0.001, toy_images)
    assert idx.tolist() == [3, 1] and torch.allclose(dist, torch.full((2,), 0.001), atol=1e-5)
    table = EmpiricalTeacher(toy_images)
    still = endpoint_sensitivity(table.denoise, x_T, toy_images, rel=0.0, nfe=11)
    assert still["endpoint_rms_change"] == 0 and still["jump_rate"] == 0 == still["nn_change_rate"]
    assert still["nn_rms"] < 1e-3  # its endpoints are training images
    moved = endpoint_sensitivity(table.denoise, x_T, toy_images, rel=0.5, nfe=11)
    assert (
        moved["nn_change_rate"] > 0.1 and moved["jump_rate"] > 0 and moved["median_change"] == 0
    )  # a big enough nudge swaps images
    smooth = GaussianTeacher(0.0, 0.5)  # linear: the change grows with the nudge
    a = endpoint_sensitivity(smooth.denoise, x_T, toy_images, rel=0.05, nfe=11)["endpoint_rms_change"]
    b = endpoint_sensitivity(smooth.denoise, x_T, toy_images, rel=0.10, nfe=11)["endpoint_rms_change"]
    assert (
        a > 0 and 1.8 * a < b <= 2.001 * a
    )  # (a little less than twice: the endpoints are clamped to [-1, 1])


def test_the_headline_leads_with_the_kid_ratio_and_states_the_floor():
    m = {
        M.FID: 70.0,
        M.KID: 0.045,
        M.KID_STD: 0.002,
        M.EVAL_N: 1000,
        M.teacher_fid(35): 35.0,
        M.teacher_kid(35): 0.015,
        M.teacher_kid_std(35): 0.001,
        M.NOISE_FLOOR_FID: 22.6,
        M.NOISE_FLOOR_KID: 0.0001,
    }
    h = E.headline(m, 35)
    assert list(h)[:3] == ["n", "fid", "kid"] and h["n"] == 1000
    assert h["kid_ratio"] == pytest.approx(3.0) and h["fid_ratio"] == pytest.approx(2.0)
    assert h["floor_fid"] == 22.6 and h["teacher_kid_std"] == 0.001
    no_teacher = E.headline({k: v for k, v in m.items() if "teacher" not in k}, 35)
    assert no_teacher["kid_ratio"] is None and no_teacher["fid_ratio"] is None


def test_the_reference_identity_changes_with_the_images_and_the_weights():
    """reference_identity: the same data, split, N and weights give the same identity; another N, another split,
    another resolution or other Inception weights give another (the reuse of recorded scores compares these)."""
    from hkd_core.config import DataConfig

    d = DataConfig()
    a = E.reference_identity(d, "test", 50, "w1")
    assert a == E.reference_identity(d, "test", 50, "w1")
    assert a["images_sha256"] != E.reference_identity(d, "test", 51, "w1")["images_sha256"]
    assert a["images_sha256"] != E.reference_identity(d, "train", 50, "w1")["images_sha256"]
    assert (
        a["images_sha256"]
        != E.reference_identity(DataConfig(resolution=28), "test", 50, "w1")["images_sha256"]
    )
    assert a != E.reference_identity(d, "test", 50, "w2")
