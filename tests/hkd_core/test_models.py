import dataclasses

import pytest
import torch

from hkd_core.architecture import PRESETS, preset
from hkd_core.models import KD, KDM, build_model, count_parameters, model_from_record, model_record

# Parameter counts at the presets' own sizes (32x32); a change here is an architecture change: update the
# README's table with it.
PARAMS = {
    ("tiny", "hkd"): 20609,
    ("small", "hkd"): 1011713,
    ("cifar", "hkd"): 19409907,
    ("small", "kd"): 731457,
    ("small", "kdm"): 1090753,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    m = build_model("hkd", name)
    cfg = m.cfg
    x = torch.randn(2, cfg.img_channels, cfg.resolution, cfg.resolution)
    zs = m.encode(x, 80.0)
    assert [tuple(z.shape[1:]) for z in zs] == [
        (d, cfg.resolution // 2**l, cfg.resolution // 2**l) for l, d in enumerate(cfg.subspace_dims)
    ]
    assert m(x, 1.0).shape == x.shape
    koopman = sum(p.numel() for p in m.koopman.parameters())
    assert koopman == sum(d * (cfg.resolution // 2**l) ** 2 for l, d in enumerate(cfg.subspace_dims))


@pytest.mark.parametrize("key", sorted(PARAMS))
def test_parameter_counts(key):
    assert count_parameters(build_model(key[1], key[0])) == PARAMS[key]


def test_ablation_switches_change_the_model_as_declared(tiny_cfg):
    full = build_model("hkd", tiny_cfg)
    # no Koopman evolution: same trunk, generators fixed at zero and not trainable
    nk = build_model("no_koopman", tiny_cfg)
    assert all(k.mode == "none" for k in nk.koopman)
    assert count_parameters(full) - count_parameters(nk) == sum(p.numel() for p in full.koopman.parameters())
    z = [torch.randn(2, k.dim, k.height, k.width) for k in nk.koopman]
    assert all(torch.equal(a, b) for a, b in zip(nk.evolve(z, 0.7), z))
    # one level: a single latent, at the coarsest level, holding all the modes
    ol = build_model("one_level", tiny_cfg)
    assert ol.levels == [tiny_cfg.levels - 1] and len(ol.spectrum()) == 1
    assert ol.koopman[0].dim == sum(tiny_cfg.subspace_dims)
    # KD: a plain U-Net, no operator; KDM: one global dense generator
    kd, kdm = build_model("kd", tiny_cfg), build_model("kdm", tiny_cfg)
    assert isinstance(kd, KD) and kd.spectrum() == []
    assert isinstance(kdm, KDM) and kdm.generator.shape == (tiny_cfg.kdm_dim, tiny_cfg.kdm_dim)
    assert kdm.spectrum()[0].shape == (tiny_cfg.kdm_dim,)
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model("pd", tiny_cfg)


def test_evolution_matters_once_the_generator_is_nonzero(tiny_cfg):
    torch.manual_seed(0)
    m = build_model("hkd", tiny_cfg)
    x = torch.randn(2, 1, 8, 8) * 5
    before = m(x, 5.0)
    with torch.no_grad():
        m.koopman[0].alpha.fill_(-2.0)
    assert not torch.allclose(m(x, 5.0), before)
    # at the data end (tau = 1) there is nothing left to evolve
    z = m.encode(x, 0.002)
    torch.testing.assert_close(m(x, 0.002), m.decode(z))


def test_one_step_sampling_and_trajectory(tiny_cfg):
    torch.manual_seed(0)
    m = build_model("hkd", tiny_cfg)
    with torch.no_grad():
        for k in m.koopman:
            k.alpha.uniform_(-2, 0)
            k.beta.uniform_(-3, 3)
    x_T = m.noise(3, torch.Generator().manual_seed(1))
    calls = []
    h = m.encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        x = m.sample(x_T=x_T)
    h.remove()
    assert len(calls) == 1 and x.shape == (3, 1, 8, 8)  # NFE = 1
    with torch.no_grad():
        tr = m.trajectory(x_T, [0.0, 0.5, 1.0])
    assert tr["previews"].shape == (3, 3, 1, 8, 8) and len(tr["latents"]) == 3
    torch.testing.assert_close(tr["previews"][-1], x)  # tau = 1 is the sample
    torch.testing.assert_close(tr["latents"][0], m.encode(x_T, 80.0))  # tau = 0 is the encoding


@pytest.mark.parametrize(
    "over, msg",
    [
        ({"subspace_dims": [4, 5]}, r"subspace_dims\[1\] \(level 2\) is 5; each d_l must be even"),
        ({"subspace_dims": [4]}, "has 1 entries"),
        (
            {"levels": 4, "subspace_dims": [4, 4, 4, 4], "resolution": 12},
            "resolution 12 allows at most 3 levels",
        ),
        ({"operator": "dense"}, "model.operator"),
        ({"attn_levels": [3]}, r"attn_levels \[3\]"),
    ],
)
def test_invalid_configs_name_the_key(over, msg):
    with pytest.raises(ValueError, match=msg):
        preset("tiny", **over)


def test_model_record_round_trip(tiny_cfg):
    for v in ("hkd", "one_level", "kd", "kdm"):
        m = build_model(v, tiny_cfg)
        rec = model_record(m)
        m2 = model_from_record(rec)
        x = torch.randn(2, 1, 8, 8)
        assert type(m2) is type(m) and m2.variant == v
        torch.testing.assert_close(m2(x, 3.0), m.eval()(x, 3.0))
    assert dataclasses.asdict(model_from_record(model_record(build_model("one_level", tiny_cfg))).cfg)[
        "latent_levels"
    ] == [2]


def test_operator_sharing_per_level(tiny_cfg):
    import dataclasses

    m = build_model("hkd", dataclasses.replace(tiny_cfg, operator=["position", "shared"]))
    assert [k.mode for k in m.koopman] == ["position", "shared"]
    assert m.koopman[1].alpha.shape == (2, 1, 1) and m.koopman[0].alpha.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="model.operator has 3 entries"):
        preset("tiny", operator=["shared"] * 3)
    with pytest.raises(ValueError, match="model.operator is"):
        preset("tiny", operator=["shared", "dense"])
