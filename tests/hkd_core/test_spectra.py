import pytest
import torch

from hkd_core.models import build_model
from hkd_core.spectra import band_masking, band_masks, band_trajectory, edit, summarize


def test_summary_scalars():
    ev = [torch.complex(torch.tensor([[-1.0, 1.0], [-3.0, 0.0]]), torch.tensor([[2.0, -2.0], [0.0, 1.0]]))[..., None]]
    s = summarize(ev)
    assert s["spectra/l1/alpha_mean"] == pytest.approx(-0.75) and s["spectra/l1/alpha_min"] == -3.0
    assert s["spectra/l1/alpha_max"] == 1.0 and s["spectra/l1/frac_growing"] == 0.25
    assert s["spectra/l1/abs_beta_mean"] == pytest.approx(1.25) and s["spectra/l1/num_modes"] == 4


def test_band_masks_partition_the_modes_in_alpha_order(koopman_model, tiny_cfg):
    m = koopman_model
    for ev, masks in zip(m.spectrum(), band_masks(m.spectrum(), 2)):
        assert masks.shape == (2,) + ev.shape
        assert torch.all(masks.sum(0) == 1)                  # each mode in exactly one band
        a = ev.real
        lo = torch.where(masks[0], a, torch.tensor(-torch.inf)).amax(0)
        hi = torch.where(masks[1], a, torch.tensor(torch.inf)).amin(0)
        assert torch.all(lo <= hi)                           # band 0 holds the smaller alphas
    # ties (the identity at initialisation) still partition
    fresh = build_model("hkd", tiny_cfg)
    assert all(torch.all(mk.sum(0) == 1) for mk in band_masks(fresh.spectrum(), 2))
    with pytest.raises(ValueError, match="3 bands need at least 3 modes"):
        band_masks(fresh.spectrum(), 3)


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
    x_T, x_ref = m.noise(2, g), m.noise(2, g)
    mask = torch.zeros(8, 8)
    mask[4:] = 1     # lower half
    with torch.no_grad():
        original = m.sample(x_T=x_T)
        torch.testing.assert_close(edit(m, x_T, x_ref, mask, 0.0, band=1, n_bands=2), original)
        assert not torch.allclose(edit(m, x_T, x_ref, mask, 1.0, band=1, n_bands=2), original)
        # r = 1: inside the mask the band's latent channels equal the reference's at tau_mid
        tau = 0.4
        z = m.evolve(m.encode(x_T, 80.0), tau)
        zr = m.evolve(m.encode(x_ref, 80.0), tau)
        masks = band_masks(m.spectrum(), 2)
        captured = []
        h = m.decoder.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        edit(m, x_T, x_ref, mask, 1.0, band=1, tau_mid=tau, n_bands=2)
        h.remove()
        z_edit = m.evolve(captured[0], -(1 - tau))   # back from tau = 1 to tau_mid
    for l, (a, b, e, mk) in enumerate(zip(z, zr, z_edit, masks)):
        size = a.shape[-1]
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[size // 2:] = True
        ch = mk[1].repeat_interleave(2, 0)                     # (d, h, w) channels of band 1
        sel = ch & inside
        torch.testing.assert_close(e[:, sel], b[:, sel], rtol=1e-4, atol=1e-5)   # reference's band arrived
        keep = ~ch | ~inside
        torch.testing.assert_close(e[:, keep], a[:, keep], rtol=1e-4, atol=1e-5)  # the rest is the original's
