import math

import pytest
import torch

from hkd_core.koopman import KoopmanOperator, evolve, sigma_of_tau, tau_of_sigma


def _random_op(d=6, h=3, w=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d // 2, h, w, generator=g, dtype=torch.float64), torch.randn(
        d // 2, h, w, generator=g, dtype=torch.float64
    ) * 3


def block_generator(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The reference form: the dense (d, d) block-diagonal generator at one position, from alpha and beta of
    shape (d/2,); the closed-form evolution must equal its matrix exponential."""
    d = 2 * alpha.shape[0]
    a = torch.zeros(d, d, dtype=alpha.dtype)
    idx = torch.arange(0, d, 2)
    a[idx, idx] = alpha
    a[idx + 1, idx + 1] = alpha
    a[idx, idx + 1] = -beta
    a[idx + 1, idx] = beta
    return a


def test_closed_form_equals_matrix_exponential_of_the_block_generator():
    alpha, beta = _random_op()
    z = torch.randn(4, 6, 3, 2, dtype=torch.float64)
    dtau = 0.37
    out = evolve(z, alpha, beta, dtau)
    for i in range(3):
        for j in range(2):
            m = torch.linalg.matrix_exp(block_generator(alpha[:, i, j], beta[:, i, j]) * dtau)
            ref = z[:, :, i, j] @ m.T
            torch.testing.assert_close(out[:, :, i, j], ref, rtol=1e-10, atol=1e-12)


def test_per_sample_time_steps_broadcast():
    alpha, beta = _random_op()
    z = torch.randn(3, 6, 3, 2, dtype=torch.float64)
    dt = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    out = evolve(z, alpha, beta, dt)
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], evolve(z[b : b + 1], alpha, beta, float(dt[b])))
    torch.testing.assert_close(out[0], z[0])


def test_evolution_composes_and_inverts():
    alpha, beta = _random_op(seed=1)
    z = torch.randn(2, 6, 3, 2, dtype=torch.float64)
    a_b = evolve(z, alpha, beta, 0.2)
    a_c = evolve(z, alpha, beta, 0.9)
    torch.testing.assert_close(evolve(a_b, alpha, beta, 0.7), a_c)
    torch.testing.assert_close(evolve(a_c, alpha, beta, -0.9), z)


def test_operator_is_identity_at_initialisation_and_counts_parameters():
    for mode, n_params in (("position", 2 * 4 * 5 * 5), ("shared", 2 * 4), ("none", 0)):
        op = KoopmanOperator(8, 5, 5, mode)
        z = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(op(z, 0.8), z)
        assert sum(p.numel() for p in op.parameters()) == n_params
        assert op.eigenvalues().shape == (4, 5, 5)


def test_shared_operator_applies_the_same_eigenvalues_everywhere():
    op = KoopmanOperator(4, 3, 3, "shared")
    with torch.no_grad():
        op.alpha.fill_(-1.0)
        op.beta.fill_(math.pi)
    z = torch.zeros(1, 4, 3, 3)
    z[:, 0] = 1.0
    out = op(z, 0.5)  # scale e^-0.5, rotate by pi/2: channel 0 -> channel 1
    torch.testing.assert_close(out[:, 0], torch.zeros(1, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1], torch.full((1, 3, 3), math.exp(-0.5)))


def test_odd_dimension_is_refused():
    with pytest.raises(ValueError, match="even"):
        KoopmanOperator(5, 2, 2)


def test_tau_maps_noise_end_to_zero_and_data_end_to_one():
    assert tau_of_sigma(80.0).item() == pytest.approx(0.0)
    assert tau_of_sigma(0.002).item() == pytest.approx(1.0)
    assert tau_of_sigma(0.0).item() == pytest.approx(1.0)  # the final state counts as sigma_min
    s = torch.tensor([50.0, 1.0, 0.01])
    torch.testing.assert_close(sigma_of_tau(tau_of_sigma(s)), s, rtol=1e-5, atol=0)
    assert torch.all(tau_of_sigma(torch.tensor([80.0, 10.0, 1.0, 0.1])).diff() > 0)


def test_bounded_alpha_never_exceeds_its_bound_and_is_alpha_near_zero():
    """model.alpha_bound = B: alpha = B tanh(rho / B) stays inside [-B, B] whatever rho becomes, under an optimiser
    pushed hard both ways, and matches the unbounded alpha where |rho| << B."""
    op = KoopmanOperator(4, 2, 2, "position", alpha_bound=2.0)
    with torch.no_grad():
        op.alpha.copy_(torch.tensor([-1e6, -3.0, 1e-3, 50.0]).view(2, 1, 2).expand(2, 2, 2))
    r = op.rates()
    assert r.abs().max() <= 2.0 and op.eigenvalues().real.abs().max() <= 2.0  # float32 tanh saturates at 1
    assert math.isclose(r[1, 0, 0].item(), 1e-3, rel_tol=1e-5)  # tanh(x) = x near 0
    free = KoopmanOperator(4, 2, 2, "position")
    with torch.no_grad():
        free.alpha.copy_(op.alpha)
    assert free.rates().abs().max() == 1e6  # unbounded: what was set
    # an optimiser that drives every rate towards -inf and +inf for many steps
    opt = torch.optim.SGD(op.parameters(), lr=100.0)
    z = torch.randn(3, 4, 2, 2)
    for sign in (1.0, -1.0):
        for _ in range(50):
            opt.zero_grad()
            (sign * op(z, 1.0).square().sum()).backward()
            opt.step()
            assert op.rates().abs().max() <= 2.0
    # evolution uses the bounded rate: exp(alpha dtau) scales a pure-real mode
    with torch.no_grad():
        op.alpha.fill_(1e9)
        op.beta.zero_()
    torch.testing.assert_close(op(torch.ones(1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), math.exp(2.0)))
    with pytest.raises(ValueError, match="alpha_bound"):
        KoopmanOperator(4, 2, 2, alpha_bound=-1.0)
