import pytest
import torch

from hkd_core.sampler import karras_sigmas, sample_euler, sample_heun, sample_nfe, steps_for_nfe
from hkd_core.teachers import GaussianTeacher

S = 0.5  # data std; the PF-ODE solution is x(sigma) = x_T * sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma_max^2)


def exact(x_T, sigma, sigma_max=80.0):
    return x_T * (S**2 + sigma**2) ** 0.5 / (S**2 + sigma_max**2) ** 0.5


def test_karras_schedule():
    s = karras_sigmas(18)
    assert len(s) == 19 and s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    assert torch.all(s.diff() < 0)
    # rho = 7: equally spaced in sigma^(1/7)
    r = s[:-1] ** (1 / 7)
    torch.testing.assert_close(r.diff(), torch.full((17,), float(r.diff()[0]), dtype=torch.float64))


def test_heun_carries_noise_to_the_gaussian_data_distribution():
    teacher = GaussianTeacher(0.0, S)
    x_T = torch.randn(50000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    x0 = sample_heun(teacher.denoise, x_T, karras_sigmas(64)).x0
    target_std = S * 80 / (S**2 + 80**2) ** 0.5
    assert x0.std().item() == pytest.approx(target_std, rel=0.01)
    assert abs(x0.mean().item()) < 0.01
    # and not just in distribution: each sample lands where the exact ODE solution does
    assert (x0 - exact(x_T, 0.0)).abs().max().item() < 0.01


def test_heun_is_second_order_and_euler_first_order():
    teacher = GaussianTeacher(0.0, S)
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    err = {}
    for name, fn in (("heun", sample_heun), ("euler", sample_euler)):
        e = [
            (fn(teacher.denoise, x_T, karras_sigmas(n)).x0 - exact(x_T, 0.0)).abs().max().item()
            for n in (50, 200)
        ]
        err[name] = e[0] / e[1]
    assert err["heun"] > 10  # ~16 for a 2nd-order method when steps x4
    assert 2 < err["euler"] < 8  # ~4 for a 1st-order method


def test_trajectory_holds_every_state_on_its_grid():
    teacher = GaussianTeacher(0.0, S)
    x_T = torch.randn(7, 2, dtype=torch.float64) * 80
    sig = karras_sigmas(40)
    tr = sample_heun(teacher.denoise, x_T, sig)
    assert tr.states.shape == (41, 7, 2) and torch.equal(tr.states[0], x_T) and torch.equal(tr.sigmas, sig)
    for i in (10, 20, 30, 40):
        torch.testing.assert_close(tr.states[i], exact(x_T, float(sig[i])), rtol=0.03, atol=1e-3)
    assert tr.nfe == 79
    assert sample_euler(teacher.denoise, x_T, sig).nfe == 40


def test_same_signature_and_callback():
    teacher = GaussianTeacher()
    seen = []
    for fn in (sample_heun, sample_euler):
        tr = fn(
            teacher.denoise, torch.randn(3, 2) * 80, karras_sigmas(4), callback=seen.append, keep_states=False
        )
        assert tr.states.shape == (1, 3, 2)
    assert [d["i"] for d in seen] == [0, 1, 2, 3] * 2 and {"x", "sigma", "sigma_next", "nfe"} <= set(seen[0])


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 35])
def test_sample_nfe_spends_exactly_that_many_evaluations(nfe):
    calls = []
    teacher = GaussianTeacher()

    def counting(x, s):
        calls.append(s)
        return teacher.denoise(x, s)

    assert sample_nfe(counting, torch.randn(2, 3) * 80, nfe).nfe == nfe == len(calls)
    name, steps = steps_for_nfe(nfe)
    assert (name == "heun") == (nfe % 2 == 1)
