"""FID/KID through torch-fidelity's standard Inception network (needs the weights: `python -m hkd_core weights`)."""

import numpy as np
import pytest
import torch

from hkd_core import evaluation as E
from hkd_core.fid import FeatureStats, InceptionFeatures, Reference, fid_from_stats, kid_from_features
from hkd_core.inception import WeightsError, weights_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def features():
    try:
        weights_path()
    except WeightsError as e:
        pytest.fail(f"{e}")  # set-up must have fetched them: a missing file is a failure, not a skip
    return InceptionFeatures(batch_size=32)


def test_fid_and_kid_equal_torch_fidelity_on_the_same_images(features, fid_images, torch_fidelity_direct):
    a, b = fid_images
    fa, fb = features(a), features(b)
    ours = fid_from_stats(FeatureStats.of(fa), FeatureStats.of(fb))
    kid, kid_std = kid_from_features(fa, fb, subset_size=16)
    assert ours == pytest.approx(torch_fidelity_direct["fid"], rel=1e-4)
    assert kid == pytest.approx(torch_fidelity_direct["kid"], rel=1e-3, abs=1e-6)
    assert kid_std == pytest.approx(torch_fidelity_direct["kid_std"], rel=1e-3, abs=1e-6)
    assert ours > 20  # two different sets of images are far apart at this N
    # a set against itself is ~0
    assert abs(fid_from_stats(FeatureStats.of(fa), FeatureStats.of(fa))) < 1e-2


def test_stats_merge_exactly_across_workers():
    f = torch.randn(50, 2048)
    whole = FeatureStats.of(f)
    parts = FeatureStats.of(f[:13]).merge(FeatureStats.of(f[13:31])).merge(FeatureStats.of(f[31:]))
    np.testing.assert_allclose(parts.mu_sigma()["sigma"], whole.mu_sigma()["sigma"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        whole.mu_sigma()["sigma"], np.cov(f.double().numpy(), rowvar=False), atol=1e-10
    )


def test_chunks_merged_score_as_the_whole_set(features, fid_images):
    a, b = fid_images
    fa, fb = features(a), features(b)
    ref = Reference({}, FeatureStats.of(fb), fb)
    whole = E.score(FeatureStats.of(fa), fa, ref, kid_subset_size=16)
    merged = E.score(
        *E.merge_chunks([E.chunk_result(fa[:11]), E.chunk_result(fa[11:])]), ref, kid_subset_size=16
    )
    assert merged["fid"] == pytest.approx(whole["fid"], rel=1e-6) and merged["kid"] == pytest.approx(
        whole["kid"]
    )
    assert whole["fid"] > 20
    itself = E.score(*E.merge_chunks([E.chunk_result(fb)]), ref, kid_subset_size=16)
    assert abs(itself["fid"]) < 1e-2


@pytest.mark.parametrize("n", [40, 2100])
def test_fid_equals_torch_fidelitys_sqrtm_formula_on_each_path(n):
    """The Frechet distance with tr sqrtm(sa sb) taken by symmetric eigendecompositions equals torch-fidelity's
    fid_statistics_to_metric (scipy's sqrtm): at n = 40 both without the features (singular covariance: the
    symmetric-root path) and with them (the Gram path), at n = 2100 > 2048 (full rank: the Cholesky path). A set
    against a shifted copy of itself is exactly the squared shift."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 2048, generator=g).abs() * 0.5
    b = (torch.randn(n, 2048, generator=g) * 0.7 + 0.2).abs() @ torch.eye(2048).roll(1, 0)
    sa, sb = FeatureStats.of(a), FeatureStats.of(b)
    theirs = fid_statistics_to_metric(sa.mu_sigma(), sb.mu_sigma(), verbose=False)[KEY_METRIC_FID]
    assert fid_from_stats(sa, sb) == pytest.approx(theirs, rel=1e-6)
    assert fid_from_stats(sa, sb, a, b) == pytest.approx(theirs, rel=1e-6)
    shifted = a + 0.25
    assert fid_from_stats(sa, FeatureStats.of(shifted), a, shifted) == pytest.approx(2048 * 0.25**2, rel=1e-6)
    # features that are not the ones the statistics summarise are not used (the exact path is taken instead)
    assert fid_from_stats(sa, sb, a[:-1], b) == pytest.approx(theirs, rel=1e-6)
