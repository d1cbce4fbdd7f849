import pytest
import torch

from hkd_core.koopman import sigma_of_tau
from hkd_core.models import build_model
from hkd_core.spectra import (
    band_frequency_shares,
    band_masking,
    band_masks,
    band_modes,
    band_trajectory,
    blend,
    edit,
    radial_shares,
    random_modes,
    reference_state,
    spectrum_distance,
    summarize,
)


def test_summary_scalars():
    ev = [
        torch.complex(torch.tensor([[-1.0, 1.0], [-3.0, 0.0]]), torch.tensor([[2.0, -2.0], [0.0, 1.0]]))[
            ..., None
        ]
    ]
    s = summarize(ev)
    assert s["spectra/l1/alpha_mean"] == pytest.approx(-0.75) and s["spectra/l1/alpha_min"] == -3.0
    assert s["spectra/l1/alpha_max"] == 1.0 and s["spectra/l1/frac_growing"] == 0.25
    assert s["spectra/l1/abs_beta_mean"] == pytest.approx(1.25) and s["spectra/l1/num_modes"] == 4


def test_band_masks_partition_the_modes_in_alpha_order(koopman_model, tiny_cfg):
    m = koopman_model
    for ev, masks in zip(m.spectrum(), band_masks(m.spectrum(), 2)):
        assert masks.shape == (2,) + ev.shape
        assert torch.all(masks.sum(0) == 1)  # each mode in exactly one band
        a = ev.real
        lo = torch.where(masks[0], a, torch.tensor(-torch.inf)).amax(0)
        hi = torch.where(masks[1], a, torch.tensor(torch.inf)).amin(0)
        assert torch.all(lo <= hi)  # band 0 holds the smaller alphas
    # ties (the identity at initialisation) still partition
    fresh = build_model("hkd", tiny_cfg)
    assert all(torch.all(mk.sum(0) == 1) for mk in band_masks(fresh.spectrum(), 2))
    with pytest.raises(ValueError, match="3 bands need at least 3 modes"):
        band_masks(fresh.spectrum(), 3)


def test_the_speed_order_groups_fast_growth_with_fast_decay():
    """alpha = [-2, -1, -0.1, 0.1, 1, 2] at one position: by alpha, band 0 = {-2, -1} and band 2 = {1, 2} (the
    fastest growth, not the slowest decay); by speed |alpha|, band 0 = {-2, 2}, band 2 = {-0.1, 0.1}."""
    alpha = torch.tensor([-2.0, -1.0, -0.1, 0.1, 1.0, 2.0])
    ev = [torch.complex(alpha, torch.zeros(6)).view(6, 1, 1)]

    def members(order):
        return [sorted(alpha[m[k].flatten()].tolist()) for m in band_masks(ev, 3, order) for k in range(3)]

    assert members("alpha") == [[-2.0, -1.0], pytest.approx([-0.1, 0.1]), [1.0, 2.0]]
    assert members("speed") == [[-2.0, 2.0], [-1.0, 1.0], pytest.approx([-0.1, 0.1])]
    with pytest.raises(ValueError, match="band order 'fast'"):
        band_masks(ev, 3, "fast")


def test_band_masking_decodes_one_band_at_a_time(koopman_model):
    m = koopman_model
    x_T = m.noise(2, torch.Generator().manual_seed(0))
    out = band_masking(m, x_T, 2)
    assert out.shape == (2, 2, 1, 8, 8) and not torch.allclose(out[0], out[1])
    level2 = band_masking(m, x_T, 2, level=2)
    assert not torch.allclose(level2[0], out[0])
    bt = band_trajectory(m, x_T, [0.0, 1.0], 2)
    assert bt.shape == (2, 3, 2, 1, 8, 8)
    torch.testing.assert_close(bt[1, 2], m.sample(x_T=x_T))


def test_editing_ratio_zero_is_the_original_and_one_takes_the_reference_band(koopman_model):
    m = koopman_model
    g = torch.Generator().manual_seed(3)
    x_T = m.noise(2, g)
    ref = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1  # reference images
    mask = torch.zeros(8, 8)
    mask[4:] = 1  # lower half
    tau = 0.4
    state = reference_state(ref, tau, g)
    band = band_modes(m.spectrum(), 1, 2)
    with torch.no_grad():
        original = m.sample(x_T=x_T)
        torch.testing.assert_close(edit(m, x_T, state, mask, 0.0, band, tau), original)
        assert not torch.allclose(edit(m, x_T, state, mask, 1.0, band, tau), original)
        # r = 1: inside the mask the band's latent channels equal the reference's own encoding at sigma(tau_mid)
        z = m.evolve(m.encode(x_T, 80.0), tau)
        zr = m.encode(state, sigma_of_tau(tau).expand(2))
        captured = []
        h = m.decoder.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        edit(m, x_T, state, mask, 1.0, band, tau)
        h.remove()
        z_edit = m.evolve(captured[0], -(1 - tau))  # back from tau = 1 to tau_mid
    for l, (a, b, e, mk) in enumerate(zip(z, zr, z_edit, band)):
        size = a.shape[-1]
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[size // 2 :] = True
        ch = mk.repeat_interleave(2, 0)  # (d, h, w) channels of band 1
        sel = ch & inside
        torch.testing.assert_close(e[:, sel], b[:, sel], rtol=1e-4, atol=1e-5)  # reference's band arrived
        keep = ~ch | ~inside
        torch.testing.assert_close(e[:, keep], a[:, keep], rtol=1e-4, atol=1e-5)  # the rest is the original's


def test_tau_mid_changes_an_edit_only_when_the_reference_comes_by_its_own_path(koopman_model):
    """Issue 13: blending a latent that was itself evolved from an encoding of noise commutes with the linear,
    per-mode evolution, so tau_mid cannot matter: evolve(blend(z_s, z_r), 1 - t) = blend(evolve(z_s), evolve(z_r))
    for every t (asserted). Encoding the reference's own state at sigma(tau_mid) breaks that: the edit
    changes with tau_mid, because the encoder sees the reference at a different noise level and the blend
    leaves a different stretch of the sample's own evolution."""
    m = koopman_model
    g = torch.Generator().manual_seed(11)
    x_T, x_T_ref = m.noise(2, g), m.noise(2, g)
    ref = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    mask = torch.ones(8, 8)
    band = band_modes(m.spectrum(), 0, 2)
    with torch.no_grad():
        z0, zr0 = m.encode(x_T, 80.0), m.encode(x_T_ref, 80.0)
        same_path = [
            m.decode(m.evolve(blend(m.evolve(z0, t), m.evolve(zr0, t), mask, 0.7, band), 1 - t))
            for t in (0.0, 0.3, 0.6, 1.0)
        ]
        for img in same_path[1:]:
            torch.testing.assert_close(img, same_path[0], rtol=1e-4, atol=1e-5)  # the commutation
        eps = torch.randn(ref.shape, generator=g)
        own = [
            edit(m, x_T, ref + float(sigma_of_tau(t)) * eps, mask, 0.7, band, t) for t in (0.0, 0.3, 0.6, 1.0)
        ]
    gaps = [(a - b).abs().max().item() for a, b in zip(own, own[1:])]
    assert min(gaps) > 1e-3, gaps


def test_random_control_draws_the_declared_number_of_modes(koopman_model):
    m = koopman_model
    for n_bands in (2,):  # tiny: 2 mode pairs per position
        for b in range(n_bands):
            chosen = band_modes(m.spectrum(), b, n_bands)
            draws = [random_modes(chosen, torch.Generator().manual_seed(i)) for i in range(3)]
            for d in draws:
                for c, r in zip(chosen, d):
                    assert r.shape == c.shape and r.dtype == torch.bool
                    assert torch.equal(r.sum(0), c.sum(0))  # as many modes at every position
            assert any(not torch.equal(d[0], chosen[0]) for d in draws)  # and not the band itself
            assert not torch.equal(draws[0][0], draws[1][0])  # draws differ


def test_radial_shares_place_energy_at_its_frequency():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    slow = torch.cos(2 * torch.pi * x / 32)[None, None]  # 1/32 cycles/pixel: low
    fast = torch.cos(2 * torch.pi * 14 * x / 32)[None, None]  # 0.44 cycles/pixel: high
    mid = torch.cos(2 * torch.pi * 8 * y / 32)[None, None]  # 0.25: mid (1/6 .. 1/3)
    torch.testing.assert_close(radial_shares(slow), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(radial_shares(fast), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(radial_shares(mid), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(radial_shares(slow + fast), torch.tensor([0.5, 0.0, 0.5]), atol=1e-6, rtol=0)


def test_band_frequency_shares_per_band_and_control(koopman_model):
    m = koopman_model
    x = m.noise(3, torch.Generator().manual_seed(2))
    out = band_frequency_shares(m, x, n_bands=2, controls=2, generator=torch.Generator().manual_seed(0))
    assert out["band"].shape == (2, 3) and out["random"].shape == (2, 3) and out["image"].shape == (3,)
    assert out["random_std"].shape == (2, 3) and (out["random_std"] >= 0).all()
    for v in (out["band"], out["random"], out["image"][None]):
        torch.testing.assert_close(v.sum(1), torch.ones(v.shape[0]))
    # band k's share is that of the decoded difference made by removing exactly band k
    with torch.no_grad():
        z1 = m.evolve(m.encode(x, 80.0), 1.0)
        masks = band_masks(m.spectrum(), 2)
        diff = m.decode(z1) - m.decode([z * (~mk[1]).repeat_interleave(2, 0) for z, mk in zip(z1, masks)])
    torch.testing.assert_close(out["band"][1], radial_shares(diff))
    # every share with a bootstrap interval over the samples that holds it
    assert (
        out["band_ci"].shape == (2, 3, 2)
        and out["random_ci"].shape == (2, 3, 2)
        and out["image_ci"].shape == (3, 2)
    )
    for v, ci in ((out["band"], out["band_ci"]), (out["random"], out["random_ci"])):
        assert (ci[..., 0] <= v + 1e-6).all() and (v <= ci[..., 1] + 1e-6).all()


def test_share_intervals_shrink_with_more_samples():
    from hkd_core.spectra import radial_energies, shares_interval

    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(256, 1, 8, 8, generator=g) * torch.rand(256, 1, 1, 1, generator=g)
    few, many = shares_interval(radial_energies(imgs[:16])), shares_interval(radial_energies(imgs))
    assert ((many[:, 1] - many[:, 0]) < (few[:, 1] - few[:, 0])).all()
    assert (many[:, 0] <= radial_shares(imgs)).all() and (radial_shares(imgs) <= many[:, 1]).all()


def test_spectrum_distance_is_zero_for_the_same_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = [
        torch.complex(torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)) for _ in range(2)
    ]
    same = spectrum_distance(a, [e.clone() for e in a])
    assert all(r["alpha_w1"] < 1e-9 and r["beta_w1"] < 1e-9 for r in same)
    # a permutation of the modes is the same distribution
    perm = [e.flatten()[torch.randperm(e.numel(), generator=g)].view(e.shape) for e in a]
    assert all(r["alpha_w1"] < 1e-9 for r in spectrum_distance(a, perm))
    # shifting alpha by d moves W1 by d; beta untouched
    shifted = [torch.complex(e.real + 0.5, e.imag) for e in a]
    d = spectrum_distance(a, shifted)
    assert all(abs(r["alpha_w1"] - 0.5) < 1e-6 and r["beta_w1"] < 1e-9 for r in d)
    assert all(0.4 < r["alpha_w1_over_std"] < 0.6 for r in d)  # alpha's std is ~1
    with pytest.raises(ValueError, match="levels"):
        spectrum_distance(a, a[:1])


def test_band_share_metrics_are_named_and_sum_to_one(koopman_model):
    from hkd_core.spectra import band_share_metrics

    out = band_share_metrics(koopman_model, n=4, n_bands=3, controls=2)  # tiny: 2 mode pairs -> 2 bands
    assert set(out) == {
        f"bands/{k}/{r}"
        for k in ("image", "band0", "band1", "random0", "random1")
        for r in ("low", "mid", "high")
    }
    for k in ("image", "band0", "band1", "random0", "random1"):
        assert abs(sum(out[f"bands/{k}/{r}"] for r in ("low", "mid", "high")) - 1) < 1e-5
