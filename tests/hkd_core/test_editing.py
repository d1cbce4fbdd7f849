import pytest
import torch

from hkd_core.editing import band_energy, edit_scores, edit_sweep, named_mask, resolve_band
from hkd_core.models import build_model
from hkd_core.spectra import band_masks


def test_sweep_r0_is_the_original_and_scores_say_so(koopman_model):
    m = koopman_model
    g = torch.Generator().manual_seed(5)
    x_T, x_ref = m.noise(3, g), m.noise(3, g)
    sw = edit_sweep(m, x_T, x_ref, named_mask("lower", 8), [0.0, 0.5, 1.0], band="high", tau_mid=0.3, n_bands=2)
    assert sw.band == 1 and sw.band_edits.shape == (3, 3, 1, 8, 8) and sw.all_edits.shape == (3, 3, 1, 8, 8)
    torch.testing.assert_close(sw.band_edits[0], sw.original, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sw.all_edits[0], sw.original, rtol=1e-4, atol=1e-5)
    for k in ("band", "all"):
        assert sw.scores[k]["structure_kept"][0] == pytest.approx(1.0, abs=1e-6)
        assert sw.scores[k]["detail_arrived"][0] == pytest.approx(0.0, abs=1e-6)
    # the edits change the image, the all-bands one at least as much inside the mask's levels
    assert not torch.allclose(sw.band_edits[2], sw.original)
    assert sw.scores["all"]["structure_kept"][2] < 1.0
    md = sw.to_markdown()
    assert "| 0.5 |" in md and "band 1 (high) of 2" in md


def test_all_bands_with_the_whole_mask_at_r1_is_the_reference(koopman_model):
    """Blending every band everywhere with r = 1 replaces the latent at tau_mid: the result is the reference."""
    m = koopman_model
    g = torch.Generator().manual_seed(6)
    x_T, x_ref = m.noise(2, g), m.noise(2, g)
    sw = edit_sweep(m, x_T, x_ref, named_mask("all", 8), [1.0], band=0, tau_mid=0.5, n_bands=2)
    torch.testing.assert_close(sw.all_edits[0], sw.reference, rtol=1e-4, atol=1e-4)
    assert sw.scores["all"]["structure_kept"][0] == pytest.approx(0.0, abs=1e-4)
    assert sw.scores["all"]["detail_arrived"][0] == pytest.approx(1.0, abs=1e-4)


def test_scores_measure_what_they_name():
    g = torch.Generator().manual_seed(0)
    orig, ref = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    mask = named_mask("all", 8)
    # coarse of the original + detail of the reference: all structure kept, all detail arrived
    coarse = torch.nn.functional.avg_pool2d(orig, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    ref_detail = ref - torch.nn.functional.avg_pool2d(ref, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    s = edit_scores(coarse + ref_detail, orig, ref, mask)
    assert s["structure_kept"] == pytest.approx(1.0) and s["detail_arrived"] == pytest.approx(1.0)
    s = edit_scores(ref, orig, ref, mask)
    assert s["structure_kept"] == pytest.approx(0.0) and s["detail_arrived"] == pytest.approx(1.0)


def test_bad_edit_arguments_are_named(koopman_model, tiny_cfg):
    m = koopman_model
    x = m.noise(1)
    with pytest.raises(ValueError, match="band 'top'"):
        resolve_band("top", 3)
    with pytest.raises(ValueError, match="band 5 out of range"):
        resolve_band(5, 3)
    with pytest.raises(ValueError, match="mask 'diagonal'"):
        named_mask("diagonal", 8)
    with pytest.raises(ValueError, match="tau_mid"):
        edit_sweep(m, x, x, named_mask("all", 8), [0.5], tau_mid=1.5, n_bands=2)
    with pytest.raises(TypeError, match="Koopman model"):
        edit_sweep(build_model("kd", tiny_cfg), x, x, named_mask("all", 8), [0.5])


def test_band_energy_follows_the_decay_rates(koopman_model):
    """Band 0 holds the most negative alphas: its energy falls fastest along tau; energies partition the latent."""
    m = koopman_model
    x = m.noise(4, torch.Generator().manual_seed(1))
    e = band_energy(m, x, [0.0, 0.5, 1.0], n_bands=2)
    assert e.shape == (3, 2, 2)
    decay = e[-1] / e[0]                                # (levels, bands)
    assert (decay[:, 0] < decay[:, 1]).all()
    masks = band_masks(m.spectrum(), 2)
    z = m.encode(x, m.sigma_max)
    for l, (zl, mk) in enumerate(zip(z, masks)):
        share = mk.flatten(1).float().mean(1)             # fraction of modes in each band
        torch.testing.assert_close((e[0, l] * share).sum(), zl.pow(2).mean(), rtol=1e-4, atol=1e-6)
