import math

import pytest
import torch

from hkd_core.koopman import KoopmanOperator, tau_of_sigma
from hkd_core.losses import HKDLoss, LambdaSchedule, l1, latent_consistency, mse, pseudo_huber
from hkd_core.sampler import karras_sigmas


def test_pseudo_huber():
    x = torch.zeros(3, 1, 4, 4)
    assert torch.equal(pseudo_huber(x, x), torch.zeros(3))
    y = torch.full_like(x, 0.5)
    c = 0.00054 * 4
    expected = (math.sqrt(16 * 0.25 + c * c) - c) / 4
    torch.testing.assert_close(pseudo_huber(x, y), torch.full((3,), expected))
    # quadratic near zero, linear far away
    small, big = pseudo_huber(x, x + 1e-5), pseudo_huber(x, x + 10)
    assert small[0] < 1e-6 and big[0] == pytest.approx(10, rel=1e-3)


def test_l1_is_per_pixel_and_robust():
    x = torch.zeros(2, 1, 4, 4)
    assert torch.equal(l1(x, x), torch.zeros(2))
    # a uniform error of e costs about e, on pseudo_huber's scale
    torch.testing.assert_close(l1(x, x + 0.5), torch.full((2,), 0.5), atol=1e-3, rtol=0)
    # per pixel, not one norm over the image: one pixel of 16 off by 2 costs 2/16 (each pixel its own |d|),
    # where pseudo_huber's single norm charges 2/4: an outlier weighs 4x less under l1
    one = x.clone()
    one[:, 0, 0, 0] = 2.0
    torch.testing.assert_close(l1(x, one), torch.full((2,), 2.0 / 16), atol=1e-3, rtol=0)
    assert pseudo_huber(x, one)[0] == pytest.approx(2.0 / 4, rel=1e-2)
    # its gradient is the median's: the sign of d, the same size for a small and a large error
    y = torch.tensor([[[[0.01, 1.0]]]], requires_grad=True)
    l1(y, torch.zeros(1, 1, 1, 2)).sum().backward()
    torch.testing.assert_close(y.grad, torch.full((1, 1, 1, 2), 0.5), atol=3e-3, rtol=0)


def test_lambda_schedule():
    s = LambdaSchedule(1.0, 0.2, 10.0)
    assert (
        s(0) == 1.0
        and s(5) == pytest.approx(0.6)
        and s(10) == pytest.approx(0.2)
        and s(50) == pytest.approx(0.2)
    )


def test_state_picks_are_distinct_intermediate_states():
    loss = HKDLoss(states_per_traj=4)
    idx = loss.pick(500, karras_sigmas(18), torch.Generator().manual_seed(0))
    assert idx.shape == (500, 4) and torch.all(idx[:, 0] == 0)
    inner = idx[:, 1:]
    assert inner.min() >= 1 and inner.max() <= 17
    assert all(len(set(r.tolist())) == 3 for r in inner)
    assert len(set(inner.flatten().tolist())) == 17  # every intermediate state gets drawn
    with pytest.raises(ValueError, match="states_per_traj=9"):
        HKDLoss(9).pick(2, karras_sigmas(7))


def test_tcons_sigma_min_leaves_out_the_low_noise_states():
    sig = karras_sigmas(18)
    loss = HKDLoss(states_per_traj=4, tcons_sigma_min=1.0)
    allowed = [i for i in range(1, 18) if sig[i] >= 1.0]
    assert 0 < len(allowed) < 17
    idx = loss.pick(400, sig, torch.Generator().manual_seed(1))
    assert set(idx[:, 1:].flatten().tolist()) == set(allowed)
    with pytest.raises(ValueError, match="tcons_sigma_min=50"):
        HKDLoss(4, tcons_sigma_min=50.0).pick(2, sig)


def test_xT_weight_sets_its_share_at_the_same_scale(toy_trajectories):
    states, sigmas = toy_trajectories
    plain = HKDLoss(4, LambdaSchedule(1.0, 1.0), lambda2=0.0)
    half = HKDLoss(4, LambdaSchedule(1.0, 1.0), lambda2=0.0, xT_weight=0.5)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same states for both
    a, b = plain(Identity(), states, sigmas, generator=g()), half(Identity(), states, sigmas, generator=g())
    torch.testing.assert_close(a["loss_recon"], b["loss_recon"])
    # 4 * (0.5 d_T + 0.5 mean(d_inner)) = 2 d_T + 2 mean(d_inner)
    torch.testing.assert_close(b["loss"], 2 * b["loss_recon"] + 2 * b["loss_tcons"], rtol=1e-5, atol=0)
    # at w = 1/s it is the plain sum
    quarter = HKDLoss(4, LambdaSchedule(1.0, 1.0), lambda2=0.0, xT_weight=0.25)
    torch.testing.assert_close(quarter(Identity(), states, sigmas, generator=g())["loss"], a["loss"])
    with pytest.raises(ValueError, match="xT_weight must be in"):
        HKDLoss(4, xT_weight=0.0)


class Identity(torch.nn.Module):
    def forward(self, x, sigma):
        return x


def test_reconstruction_and_consistency_terms(toy_trajectories):
    states, sigmas = toy_trajectories
    one = HKDLoss(1, LambdaSchedule(1.0, 1.0), lambda2=0.0)
    out = one(Identity(), states, sigmas)
    # s = 1: only x_T enters, and the identity model's error is |x_T - x_0|^2
    torch.testing.assert_close(out["loss_recon"], mse(states[:, 0], states[:, -1]).mean())
    assert out["loss_tcons"] == 0 and torch.isclose(out["loss"], out["loss_recon"])
    four = HKDLoss(4, LambdaSchedule(1.0, 1.0), lambda2=0.0)
    out4 = four(Identity(), states, sigmas, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out4["loss_recon"], out["loss_recon"])
    # intermediate states are closer to x_0 than x_T is, so the consistency term is smaller
    assert 0 < out4["loss_tcons"] < out4["loss_recon"]
    torch.testing.assert_close(out4["loss"], out4["loss_recon"] + 3 * out4["loss_tcons"], rtol=1e-5, atol=0)


class LinearToy(torch.nn.Module):
    """A model whose latent is the image itself (one level, 2 channels read as one mode pair per pixel) and whose
    dynamics are one Koopman operator: the latent-consistency term's ground truth."""

    def __init__(self):
        super().__init__()
        self.op = KoopmanOperator(2, 8, 8, "position")
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            self.op.alpha.copy_(-torch.rand(1, 8, 8, generator=g) * 2)
            self.op.beta.copy_(torch.randn(1, 8, 8, generator=g))

    def forward(self, x, sigma, latent_tau=None, decode=None):
        tau = tau_of_sigma(sigma)
        out = self.op(x, 1 - tau)
        out = out if decode is None else out[decode]
        return out if latent_tau is None else (out, [self.op(x, latent_tau - tau)])


def test_latent_consistency_is_zero_on_an_exactly_linear_system_and_positive_otherwise():
    """Trajectories that are orbits of the toy's own linear evolution, x(tau) = exp(A tau) x(0): every state's
    latent evolved to a later state's tau equals that state's latent, so the term is 0 (to float precision);
    any trajectory that leaves the orbit makes it positive, and it grows with the departure."""
    toy = LinearToy()
    sigmas = karras_sigmas(6)
    taus = tau_of_sigma(sigmas)
    x0 = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        states = torch.stack([toy.op(x0, t) for t in taus.tolist()], 1)  # (16, 7, 2, 8, 8) on the orbit
        loss = HKDLoss(1, LambdaSchedule(1.0, 1.0), lambda2=0.0, latent_weight=1.0)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        on = loss(toy, states, sigmas, generator=g())
        assert on["loss_latent"] < 1e-10
        torch.testing.assert_close(on["loss"], on["loss_recon"] + on["loss_latent"])
        bumped = states.clone()
        bumped[:, 1:-1] += 0.05 * torch.randn(
            bumped[:, 1:-1].shape, generator=torch.Generator().manual_seed(3)
        )
        off = loss(toy, bumped, sigmas, generator=g())["loss_latent"]
        more = states.clone()
        more[:, 1:-1] += 0.5 * torch.randn(more[:, 1:-1].shape, generator=torch.Generator().manual_seed(3))
        assert 0 < off < loss(toy, more, sigmas, generator=g())["loss_latent"]
        # the x_T reconstruction is unchanged by the extra state the latent term draws (s = 1)
        torch.testing.assert_close(
            on["loss_recon"],
            HKDLoss(1, LambdaSchedule(1.0, 1.0), lambda2=0.0)(toy, states, sigmas)["loss_recon"],
        )
    # scale-free: shrinking every latent does not shrink the relative residual
    a, b = [torch.randn(4, 6, 3, 3)], [torch.randn(4, 6, 3, 3)]
    torch.testing.assert_close(latent_consistency(a, b), latent_consistency([a[0] * 1e-3], [b[0] * 1e-3]))


def test_latent_term_on_hkd_matches_its_formula_and_trains_encoder_and_spectrum(
    koopman_model, toy_trajectories
):
    """On the real HKD (spread-out spectrum): the term equals |evolve(E(x_T), tau_s - tau_T) - E(x_s)|^2 /
    |E(x_s)|^2 computed by hand for the drawn state, and its gradient reaches the encoder and the rates."""
    states, sigmas = toy_trajectories
    m = koopman_model
    loss = HKDLoss(1, LambdaSchedule(1.0, 1.0), lambda2=0.0, latent_weight=0.5)
    idx = loss.pick(8, sigmas, torch.Generator().manual_seed(4))
    assert idx.shape == (8, 2) and (idx[:, 0] == 0).all() and (idx[:, 1] > 0).all()
    out = loss(m, states[:8], sigmas, generator=torch.Generator().manual_seed(4))
    x_T, s_T = states[:8, 0], sigmas[0].expand(8)
    x_s, s_s = states[torch.arange(8), idx[:, 1]], sigmas[idx[:, 1]]
    dtau = tau_of_sigma(s_s) - tau_of_sigma(s_T)
    by_hand = latent_consistency(m.evolve(m.encode(x_T, s_T), dtau), m.encode(x_s, s_s)).mean()
    torch.testing.assert_close(out["loss_latent"], by_hand.detach(), rtol=1e-4, atol=1e-7)
    assert out["loss_latent"] > 0
    # the extra state is encoded, not decoded: the reconstruction term is x_T's alone, as without the latent term
    with torch.no_grad():
        torch.testing.assert_close(
            out["loss_recon"],
            HKDLoss(1, LambdaSchedule(1.0, 1.0), lambda2=0.0)(m, states[:8], sigmas)["loss_recon"],
            rtol=1e-5,
            atol=1e-7,
        )
        rows = torch.tensor([0, 2, 5])
        torch.testing.assert_close(
            m(states[:8, 0], sigmas[0], decode=rows), m(states[:8, 0], sigmas[0])[rows], rtol=1e-5, atol=1e-6
        )
    out["loss"].backward()
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(k.alpha.grad.abs().sum() > 0 for k in m.koopman)
    with pytest.raises(ValueError, match="latent_weight must be >= 0"):
        HKDLoss(1, latent_weight=-1.0)


def test_lpips_needs_local_weights(tmp_path):
    from hkd_core.losses import perceptual_distance

    with pytest.raises(FileNotFoundError, match="LPIPS weights .*vgg.pth not found"):
        perceptual_distance("lpips", vgg_path=tmp_path / "vgg.pth", lin_path=tmp_path / "lin.pth")
    with pytest.raises(ValueError, match="loss.perceptual is 'ssim'"):
        perceptual_distance("ssim")
    assert perceptual_distance("pseudo_huber") is pseudo_huber and perceptual_distance("l1") is l1


def test_lpips_weight_paths_reach_the_loss_from_the_train_config(tmp_path, koopman_model, toy_trajectories):
    """train.lpips_vgg_path / lpips_lin_path are what train_hkd hands to LPIPS (before the first step): the
    missing file is named, instead of a TypeError from a loss built without paths."""
    from hkd_core.train import train_hkd

    states, sigmas = toy_trajectories
    vgg = tmp_path / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match=f"LPIPS weights {vgg} not found"):
        train_hkd(
            koopman_model,
            states,
            sigmas,
            progress=False,
            total_kimg=0.001,
            batch_size=4,
            perceptual="lpips",
            lpips_vgg_path=str(vgg),
            lpips_lin_path=str(tmp_path / "lin.pth"),
        )


def test_teacher_feature_distance_is_zero_for_equal_images_and_grows_with_distortion(unet_teacher):
    """train.perceptual=teacher: d(x, x) = 0; under additive noise of growing strength and under growing
    blur the distance grows monotonically; it is symmetric and per-sample."""
    from hkd_core.losses import TeacherFeatureDistance, perceptual_distance

    d = perceptual_distance("teacher", denoiser=unet_teacher(), sigma=0.5)
    assert isinstance(d, TeacherFeatureDistance)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    assert d(x, x).shape == (6,) and d(x, x).abs().max() == 0
    e = torch.randn(x.shape, generator=g)
    by_noise = [d(x + s * e, x).mean().item() for s in (0.02, 0.1, 0.3, 1.0)]
    assert all(a < b for a, b in zip(by_noise, by_noise[1:])), by_noise
    blur = [
        d(torch.nn.functional.avg_pool2d(x, k, 1, k // 2)[..., :16, :16], x).mean().item() for k in (3, 5, 7)
    ]
    assert 0 < blur[0] < blur[1] < blur[2], blur
    torch.testing.assert_close(d(x + 0.1 * e, x), d(x, x + 0.1 * e))


def test_teacher_feature_distance_trains_the_student_not_the_teacher(unet_teacher):
    """Gradients reach the image being scored, never the frozen teacher copy (which is also not the
    teacher object given: changing that one afterwards changes nothing)."""
    from hkd_core.losses import TeacherFeatureDistance

    net = unet_teacher()
    d = TeacherFeatureDistance(net, sigma=1.0)
    x = torch.zeros(2, 1, 16, 16, requires_grad=True)
    y = torch.rand(2, 1, 16, 16)
    before = d(x, y).detach()
    d(x, y).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in d.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    torch.testing.assert_close(d(x, y).detach(), before)


def test_teacher_perceptual_needs_the_teacher():
    from hkd_core.losses import perceptual_distance
    from hkd_core.models import build_model
    from hkd_core.train import train_hkd

    with pytest.raises(TypeError, match="EDMPrecond"):
        perceptual_distance("teacher", denoiser=build_model("kd", "tiny"))
    with pytest.raises(ValueError, match="perceptual=teacher needs the teacher network"):
        train_hkd(
            build_model("hkd", "tiny"),
            torch.zeros(4, 3, 1, 32, 32),
            torch.tensor([80.0, 1.0, 0.002]),
            perceptual="teacher",
            progress=False,
        )
