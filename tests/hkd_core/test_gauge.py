"""The spectrum's gauge (issue 24): the symmetry under sigma-conditioned observables, the two fixes that break
it, the offset that keeps the samples, and the matching of modes between two models."""

import copy
from dataclasses import replace

import pytest
import torch

from hkd_core.gauge import (
    alpha_offsets,
    canonical_gauge,
    canonical_spectrum,
    gauge_transform,
    match_modes,
    offset_alpha,
    offset_draw,
    offset_survival,
    shifted_sigma,
    spectrum_agreement,
)
from hkd_core.losses import HKDLoss
from hkd_core.models import build_model


def _gauge(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    cs = [torch.rand(k.dim // 2, generator=g) * 2 - 1 for k in model.koopman]
    thetas = [torch.rand(k.dim // 2, generator=g) * 2 - 1 for k in model.koopman]
    return cs, thetas


def _states(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    sigma = torch.exp(torch.empty(n).uniform_(-2, 4, generator=g))
    return x * sigma.view(-1, 1, 1, 1), sigma


def test_the_gauge_leaves_outputs_and_the_latent_residual_unchanged(koopman_model, toy_trajectories):
    """The symmetry, documented: alpha + c, beta + theta and an encoder gain exp(c (tau - 1)) R(theta (tau - 1))
    compute the same x_0 at every noise level, for any c and theta per mode. The latent residual is relative
    over all modes together, so a per-mode c reweights its modes (a zero residual stays zero); with one c for
    every mode (and any theta per mode) the whole loss, latent term included, is unchanged."""
    m = koopman_model
    cs, thetas = _gauge(m)
    moved = gauge_transform(m, cs, thetas)
    assert not torch.allclose(moved.koopman[0].alpha, m.koopman[0].alpha)
    x, sigma = _states()
    states, sigmas = toy_trajectories
    loss = HKDLoss(states_per_traj=2, latent_weight=1.0)
    common = gauge_transform(m, [torch.full_like(c, 0.7) for c in cs], thetas)
    with torch.no_grad():
        torch.testing.assert_close(moved(x, sigma), m(x, sigma), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(common(x, sigma), m(x, sigma), atol=1e-4, rtol=1e-4)
        a = loss(m, states[:16], sigmas, 0.0, torch.Generator().manual_seed(0))
        b = loss(common, states[:16], sigmas, 0.0, torch.Generator().manual_seed(0))
    assert a["loss_latent"] > 1e-3
    torch.testing.assert_close(b["loss_latent"], a["loss_latent"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["loss"], a["loss"], atol=1e-5, rtol=1e-4)


def test_the_canonical_gauge_gives_one_spectrum_per_orbit_and_keeps_the_outputs(koopman_model):
    """Two members of one gauge orbit (here moved by a c and theta per mode *and position*) have different
    spectra but the same canonical one; moving a model to its canonical gauge keeps its outputs, and there the
    encoder's mean slopes are zero (measured again, the canonical gauge of the canonical model is no move)."""
    m = koopman_model.eval()
    g = torch.Generator().manual_seed(5)
    cs = [torch.rand(k.alpha.shape, generator=g) * 2 - 1 for k in m.koopman]
    thetas = [torch.rand(k.beta.shape, generator=g) - 0.5 for k in m.koopman]
    moved = gauge_transform(m, cs, thetas)
    images = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    x, sigma = _states()
    with torch.no_grad():
        torch.testing.assert_close(moved(x, sigma), m(x, sigma), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(moved.spectrum()[0].real, m.spectrum()[0].real, atol=0.05)
    a = canonical_spectrum(m, images, torch.Generator().manual_seed(1))
    b = canonical_spectrum(moved, images, torch.Generator().manual_seed(1))
    for ea, eb in zip(a, b):
        torch.testing.assert_close(eb, ea, atol=2e-3, rtol=1e-3)
    canon = gauge_transform(m, *canonical_gauge(m, images, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        torch.testing.assert_close(canon(x, sigma), m(x, sigma), atol=1e-4, rtol=1e-4)
    for c, th in zip(*canonical_gauge(canon, images, torch.Generator().manual_seed(1))):
        assert c.abs().max() < 1e-2 and th.abs().max() < 1e-2  # against c, theta of order 1 above
    # measured on other states, the canonical gauge of one model moves by a little, not by the orbit's spread
    other = canonical_spectrum(
        m, torch.rand(24, 1, 8, 8, generator=g) * 2 - 1, torch.Generator().manual_seed(2)
    )
    assert all((o.real - e.real).abs().mean() < (c.abs().mean()) for o, e, c in zip(other, a, cs))


def test_state_observables_cannot_represent_the_gauge(koopman_model):
    """model.observables=state: the latents do not change with the noise level at a fixed state; the gauge's
    image of the model does, so it is not a model of this kind."""
    torch.manual_seed(0)
    m = build_model("hkd", replace(koopman_model.cfg, observables="state")).eval()
    m.load_state_dict(koopman_model.state_dict())
    x, _ = _states()
    lo, hi = torch.full((8,), 0.5), torch.full((8,), 20.0)
    with torch.no_grad():
        for a, b in zip(m.encode(x, lo), m.encode(x, hi)):
            torch.testing.assert_close(a, b)
        moved = gauge_transform(m, *_gauge(m))
        diff = max((a - b).abs().max().item() for a, b in zip(moved.encode(x, lo), moved.encode(x, hi)))
    assert diff > 1e-2


def test_the_gauge_condition_scores_the_gauges_image_differently(koopman_model, toy_trajectories):
    """train.gauge_weight: the condition is the encoder's net per-mode slope against its noise input; moving
    along the orbit changes it (it is not a symmetry of the loss any more), and observables of the state alone
    meet it exactly."""
    states, sigmas = toy_trajectories
    loss = HKDLoss(states_per_traj=1, latent_weight=0.1, gauge_weight=1.0)
    m = koopman_model

    def gauge_term(model):
        with torch.no_grad():
            return loss(model, states[:32], sigmas, 0.0, torch.Generator().manual_seed(0))[
                "loss_gauge"
            ].item()

    cs, thetas = _gauge(m)
    base, moved = gauge_term(m), gauge_term(gauge_transform(m, cs, thetas))
    assert abs(moved - base) > 0.1 * max(base, 1e-3), (base, moved)
    # the slope moves by 2c per mode: a larger c moves the condition further from its value on the model
    far = gauge_term(gauge_transform(m, [3 * c for c in cs], [3 * t for t in thetas]))
    assert far > moved
    state = build_model("hkd", replace(m.cfg, observables="state")).eval()
    state.load_state_dict(m.state_dict())
    assert gauge_term(state) == pytest.approx(0.0, abs=1e-9)


def test_the_shifted_noise_level_stays_on_the_grid():
    sigma = torch.tensor([80.0, 5.0, 0.5, 0.002])
    s2, dtau = shifted_sigma(sigma, torch.Generator().manual_seed(0))
    assert torch.allclose(dtau.abs(), torch.full((4,), 0.25))
    assert dtau[0] > 0 and dtau[-1] < 0  # turned round at the two ends
    assert ((s2 >= 0.002 - 1e-6) & (s2 <= 80 + 1e-3)).all()


def test_an_alpha_offset_keeps_the_samples_and_moves_alpha(tiny_cfg):
    torch.manual_seed(0)
    m = build_model("hkd", tiny_cfg).eval()
    with torch.no_grad():
        for k in m.koopman:
            k.alpha.uniform_(-1, 0.5)
    moved = copy.deepcopy(m)
    offs = alpha_offsets(moved, 0.5, 0.5, seed=1)
    offset_alpha(moved, offs)
    x_T = torch.randn(4, 1, 8, 8) * 80
    with torch.no_grad():
        torch.testing.assert_close(moved.sample(x_T=x_T), m.sample(x_T=x_T), atol=1e-5, rtol=1e-4)
    for k0, k1, o in zip(m.koopman, moved.koopman, offs):
        torch.testing.assert_close(k1.alpha - k0.alpha, o.view(-1, 1, 1).expand_as(k0.alpha))
    assert all(((o >= 0) & (o <= 1)).all() for o in offs) and len({round(float(o[0]), 6) for o in offs}) > 1


def test_offset_survival_reads_how_much_of_a_start_offset_is_left(tiny_cfg):
    """The gauge table's 'offset kept': the start offsets drawn again from the mode counts alone (as a run drew
    them), 1 when a run's alpha differs from the zero run's by exactly its offset, 0 when by nothing, 0.5 for half,
    and positions averaged (noise that is not the offset does not count as kept)."""
    m = build_model("hkd", tiny_cfg)
    offs = alpha_offsets(m, 0.0, 0.5, seed=3)
    again = offset_draw([k.dim // 2 for k in m.koopman], 0.0, 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(offs, again))
    g = torch.Generator().manual_seed(0)
    a0 = [torch.randn(len(o), 4, 4, generator=g) for o in offs]
    kept = [a + o.view(-1, 1, 1) for a, o in zip(a0, offs)]
    half = [a + 0.5 * o.view(-1, 1, 1) for a, o in zip(a0, offs)]
    noise = [a + 0.1 * torch.randn(a.shape, generator=g) for a in a0]
    assert offset_survival(a0, kept, offs) == pytest.approx([1.0] * len(offs))
    assert offset_survival(a0, half, offs) == pytest.approx([0.5] * len(offs))
    assert all(abs(v) < 0.3 for v in offset_survival(a0, noise, offs))


def test_mode_matching_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(0)
    a = torch.complex(torch.randn(8, 3, 3, generator=g), torch.randn(8, 3, 3, generator=g))
    perm = torch.stack([torch.randperm(8, generator=g) for _ in range(9)], 1).view(8, 3, 3)
    b = torch.empty_like(a)
    b.scatter_(0, perm, a)  # b[perm[k]] = a[k]
    b = torch.complex(
        b.real, b.imag * torch.where(torch.rand(8, 3, 3, generator=g) < 0.5, -1.0, 1.0)
    )  # pair order
    for method in ("hungarian", "sort"):
        assert torch.equal(match_modes(a, b, method), perm), method
    assert torch.equal(match_modes(a, b + 0.7), perm)  # an offset common to the modes does not steer it
    agree = spectrum_agreement([a], [b + 0.25])[0]
    assert agree["alpha_corr"] == pytest.approx(1.0) and agree["alpha_mean_diff"] == pytest.approx(0.25)
    assert agree["abs_beta_corr"] == pytest.approx(1.0)
    assert agree["alpha_corr_unmatched"] < 0.9
