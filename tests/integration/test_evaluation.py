"""FID at scale on the real stack: statistics accumulated per Ray task and merged equal torch-fidelity's own
computation; reference statistics cached in S3 are reused, and recomputed when N or the weights change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pc(local_stack, smoke, tmp_path_factory):
    from orchestrator.config import load
    from orchestrator.stages.driver import init_ray

    tag = tmp_path_factory.mktemp("evtag").name[-8:].replace("_", "")
    p = load([*smoke, f"storage.prefix=ev-{tag}", "cluster.generation_tasks=3"])
    init_ray(p)
    return p


def test_distributed_fid_equals_torch_fidelity(pc, fid_images, torch_fidelity_direct):
    """Statistics accumulated per Ray task in float64 and merged on the driver give torch-fidelity's FID."""
    from hkd_core.fid import fid_from_stats, kid_from_features
    from orchestrator.stages.evaluation import image_features

    a, b = fid_images
    sa, fa = image_features(pc, a, tasks=2)  # two chunks, merged
    sb, fb = image_features(pc, b, tasks=1)
    assert sa.n == len(a) and sb.n == len(b) and fa.shape == (len(a), 2048)
    assert fid_from_stats(sa, sb) == pytest.approx(torch_fidelity_direct["fid"], rel=1e-4)
    kid, _ = kid_from_features(fa, fb, subset_size=16)
    assert kid == pytest.approx(torch_fidelity_direct["kid"], rel=1e-3, abs=1e-6)


def test_reference_statistics_cached_in_s3_reused_and_recomputed(pc, s3, tmp_path):
    from hkd_core.fid import reference_cache_name
    from hkd_core.inception import weights_path
    from orchestrator.stages.evaluation import reference

    def with_eval(**kw):
        return dataclasses.replace(
            pc, run=dataclasses.replace(pc.run, eval=dataclasses.replace(pc.run.eval, **kw))
        )

    def keys():
        page = s3.list_objects_v2(Bucket=pc.storage.bucket, Prefix=f"{pc.storage.prefix}/fid-refs/")
        return sorted(o["Key"] for o in page.get("Contents", []))

    small = with_eval(n=20)
    r1, _, computed = reference(small)
    assert (
        computed
        and r1.stats.n == 20
        and keys() == [f"{pc.storage.prefix}/fid-refs/{reference_cache_name(r1.key)}"]
    )
    r2, _, computed = reference(small)  # the same (data, split, N, weights): reused
    assert not computed and torch.equal(r1.features, r2.features) and len(keys()) == 1
    r3, _, computed = reference(with_eval(n=24))  # another N: computed anew, its own object
    assert computed and r3.stats.n == 24 and len(keys()) == 2
    assert r3.features.shape == (24, 2048) and r3.key["n"] == 24

    # other weights (one value changed: another sha256): computed anew
    sd = torch.load(weights_path(pc.run.eval.inception_weights), map_location="cpu", weights_only=True)
    name = next(k for k, v in sd.items() if v.dtype.is_floating_point and v.numel() > 1)
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] += 1e-3
    other = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(sd, other)
    r4, _, computed = reference(with_eval(n=20, inception_weights=str(other)))
    assert computed and r4.key["weights"] != r1.key["weights"] and len(keys()) == 3
