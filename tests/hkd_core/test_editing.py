import pytest
import torch

from hkd_core.editing import band_energy, edit_scores, edit_sweep, named_mask, resolve_band
from hkd_core.koopman import sigma_of_tau
from hkd_core.models import build_model
from hkd_core.spectra import band_masks, reference_state


def test_sweep_r0_is_the_original_and_scores_say_so(koopman_model):
    m = koopman_model
    g = torch.Generator().manual_seed(5)
    x_T, refs = m.noise(3, g), torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    sw = edit_sweep(
        m,
        x_T,
        refs,
        named_mask("lower", 8),
        [0.0, 0.5, 1.0],
        band="high",
        tau_mid=0.3,
        n_bands=2,
        controls=3,
        generator=g,
    )
    assert sw.band == 1 and sw.controls == 3
    for imgs in (sw.band_edits, sw.random_edits, sw.all_edits):
        assert imgs.shape == (3, 3, 1, 8, 8)
        torch.testing.assert_close(imgs[0], sw.original, rtol=1e-4, atol=1e-5)
    for k in ("band", "random", "all"):
        assert sw.scores[k]["structure_kept"][0] == pytest.approx(1.0, abs=1e-6)
        assert sw.scores[k]["detail_arrived"][0] == pytest.approx(0.0, abs=1e-6)
    # the edits change the image; the band and its control blend different modes
    assert not torch.allclose(sw.band_edits[2], sw.original)
    assert not torch.allclose(sw.band_edits[2], sw.random_edits[2])
    assert sw.scores["all"]["structure_kept"][2] < 1.0
    md = sw.to_markdown()
    assert (
        "| 0.5 |" in md
        and "band 1 (high) of 2" in md
        and "random: structure kept" in md
        and "mean of 3" in md
    )


def test_all_bands_with_the_whole_mask_at_r1_is_the_model_on_the_references_state(koopman_model):
    """Blending every band everywhere with r = 1 replaces the sample's latent at tau_mid by the reference's own
    encoding there: the result is the model's one-step output from the reference's state, x_hat(x_ref_t)."""
    m = koopman_model
    g = torch.Generator().manual_seed(6)
    x_T, refs = m.noise(2, g), torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    sw = edit_sweep(
        m,
        x_T,
        refs,
        named_mask("all", 8),
        [1.0],
        band=0,
        tau_mid=0.5,
        n_bands=2,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(sw.ref_state, reference_state(refs, 0.5, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        torch.testing.assert_close(sw.all_edits[0], m(sw.ref_state, sigma_of_tau(0.5)), rtol=1e-4, atol=1e-4)


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
    with pytest.raises(ValueError, match="controls=0"):
        edit_sweep(m, x, x, named_mask("all", 8), [0.5], n_bands=2, controls=0)
    with pytest.raises(TypeError, match="Koopman model"):
        edit_sweep(build_model("kd", tiny_cfg), x, x, named_mask("all", 8), [0.5])


def test_band_energy_follows_the_decay_rates(koopman_model):
    """Band 0 holds the most negative alphas: its energy falls fastest along tau; energies partition the latent."""
    m = koopman_model
    x = m.noise(4, torch.Generator().manual_seed(1))
    e = band_energy(m, x, [0.0, 0.5, 1.0], n_bands=2)
    assert e.shape == (3, 2, 2)
    decay = e[-1] / e[0]  # (levels, bands)
    assert (decay[:, 0] < decay[:, 1]).all()
    masks = band_masks(m.spectrum(), 2)
    z = m.encode(x, m.sigma_max)
    for l, (zl, mk) in enumerate(zip(z, masks)):
        share = mk.flatten(1).float().mean(1)  # fraction of modes in each band
        torch.testing.assert_close((e[0, l] * share).sum(), zl.pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_the_edit_grid_stays_readable_with_many_samples(koopman_model, tmp_path):
    """16 samples: the grid draws the first three (nine rows), not 48 rows; its height does not grow with N."""
    from PIL import Image

    from hkd_core.edit_figures import plot_edit_grid

    m = koopman_model
    g = torch.Generator().manual_seed(5)
    heights = {}
    for n in (3, 16):
        x_T, refs = m.noise(n, g), torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        sw = edit_sweep(
            m, x_T, refs, named_mask("lower", 8), [0.0, 1.0], band=0, tau_mid=0.3, n_bands=2, generator=g
        )
        heights[n] = Image.open(plot_edit_grid(sw, tmp_path / f"grid{n}.png")).size[1]
    assert heights[16] == heights[3]


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_more_samples():
    from hkd_core.editing import bootstrap_interval

    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(16, generator=g) + 2.0, torch.randn(256, generator=g) + 2.0
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)  # about 1 / sqrt(16): a quarter
    assert lo_l < 2.0 < hi_l
    assert bootstrap_interval(small) == (lo_s, hi_s)  # seeded: the same table twice


def test_the_edit_table_gives_intervals_and_the_paired_band_difference(koopman_model):
    m = koopman_model
    g = torch.Generator().manual_seed(5)
    x_T, refs = m.noise(12, g), torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    sw = edit_sweep(
        m,
        x_T,
        refs,
        named_mask("lower", 8),
        [0.0, 1.0],
        band=0,
        tau_mid=0.3,
        n_bands=2,
        controls=2,
        generator=g,
    )
    t = sw.table()[1]
    for k in ("band", "random", "all"):
        lo, hi = t[f"{k}_detail_arrived_ci"]
        assert lo <= t[f"{k}_detail_arrived"] <= hi
    assert t["band_minus_random_detail_arrived"] == pytest.approx(
        t["band_detail_arrived"] - t["random_detail_arrived"]
    )
    assert sw.table()[0]["band_minus_random_structure_kept_ci"] == pytest.approx(
        [0.0, 0.0], abs=1e-9
    )  # r = 0
    assert "band - random: detail arrived" in sw.to_markdown()
