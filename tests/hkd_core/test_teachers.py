import torch

from hkd_core.teachers import EmpiricalTeacher, GaussianTeacher, Teacher


def direct(data, x, sigma):
    w = torch.softmax(-((x[:, None] - data[None]) ** 2).sum(-1) / (2 * sigma**2), 1)
    return w @ data


def test_empirical_denoiser_is_exact_on_a_tiny_set():
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    x = torch.randn(20, 2, dtype=torch.float64) * 2
    for chunk in (1, 7, 50, 1000):  # streaming over the data must not change the answer
        t = EmpiricalTeacher(data, chunk_size=chunk, dtype=torch.float64)
        for sigma in (0.003, 0.1, 1.0, 80.0):
            torch.testing.assert_close(t.denoise(x, sigma), direct(data, x, sigma), rtol=1e-7, atol=1e-9)


def test_empirical_denoiser_limits():
    data = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    t = EmpiricalTeacher(data, dtype=torch.float64)
    # tiny sigma: the nearest training point; huge sigma: the data mean
    x = data + 1e-3 * torch.randn_like(data)
    torch.testing.assert_close(t.denoise(x, 1e-3), data)
    torch.testing.assert_close(
        t.denoise(torch.zeros(2, 1, 4, 4, dtype=torch.float64), 1e4),
        data.mean(0, keepdim=True).expand(2, -1, -1, -1),
        rtol=1e-4,
        atol=1e-6,
    )
    # per-sample sigmas
    s = torch.tensor([1e-3] * 8 + [1e4] * 8, dtype=torch.float64)
    out = t.denoise(x, s)
    torch.testing.assert_close(out[:8], data[:8])
    assert t.identity["kind"] == "empirical" and t.identity["n"] == 16 and isinstance(t, Teacher)


def test_gaussian_teacher_is_the_posterior_mean():
    t = GaussianTeacher(0.2, 0.5)
    x = torch.tensor([1.2])
    # E[x0 | x] = m + s^2/(s^2+sigma^2)(x - m)
    assert torch.allclose(t.denoise(x, 1.0), torch.tensor([0.2 + 0.25 / 1.25 * 1.0]))
