"""FID/KID through torch-fidelity's standard Inception network (needs the weights: `python -m hkd_core weights`)."""
import numpy as np
import pytest
import torch

from hkd_core.fid import FeatureStats, InceptionFeatures, evaluate_features, fid_from_stats, kid_from_features, \
    reference_stats
from hkd_core.inception import WeightsError, weights_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def features():
    try:
        weights_path()
    except WeightsError as e:
        pytest.fail(f"{e}")   # set-up must have fetched them: a missing file is a failure, not a skip
    return InceptionFeatures(batch_size=32)


def test_fid_and_kid_equal_torch_fidelity_on_the_same_images(features, fid_images, torch_fidelity_direct):
    a, b = fid_images
    fa, fb = features(a), features(b)
    ours = fid_from_stats(FeatureStats.of(fa), FeatureStats.of(fb))
    kid, kid_std = kid_from_features(fa, fb, subset_size=16)
    assert ours == pytest.approx(torch_fidelity_direct["fid"], rel=1e-4)
    assert kid == pytest.approx(torch_fidelity_direct["kid"], rel=1e-3, abs=1e-6)
    assert kid_std == pytest.approx(torch_fidelity_direct["kid_std"], rel=1e-3, abs=1e-6)
    assert ours > 20   # two different sets of images are far apart at this N
    # a set against itself is ~0
    assert abs(fid_from_stats(FeatureStats.of(fa), FeatureStats.of(fa))) < 1e-2


def test_stats_merge_exactly_across_workers():
    f = torch.randn(50, 2048)
    whole = FeatureStats.of(f)
    parts = FeatureStats.of(f[:13]).merge(FeatureStats.of(f[13:31])).merge(FeatureStats.of(f[31:]))
    np.testing.assert_allclose(parts.mu_sigma()["sigma"], whole.mu_sigma()["sigma"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(whole.mu_sigma()["sigma"], np.cov(f.double().numpy(), rowvar=False), atol=1e-10)


def test_reference_statistics_are_cached_per_n(features, tmp_path):
    r1 = reference_stats("fashion_mnist", "test", 16, features, 32, cache=tmp_path, progress=False)
    files = list(tmp_path.glob("ref-*.npz"))
    assert len(files) == 1 and "n16" in files[0].name and features.sha256[:16] in files[0].name
    mtime = files[0].stat().st_mtime_ns
    r2 = reference_stats("fashion_mnist", "test", 16, features, 32, cache=tmp_path, progress=False)
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(r1.features, r2.features)
    reference_stats("fashion_mnist", "test", 20, features, 32, cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("ref-*.npz"))) == 2
    m = evaluate_features(r1.features, r1, kid_subset_size=8)
    assert abs(m["fid"]) < 1e-2 and m["n"] == 16
