"""The gauge of a dense generator (KDM): the same freedom as HKD's, in the generator's eigenbasis, and the
canonical spectrum that does not see it."""

import copy

import torch

from hkd_core.gauge import canonical_spectrum, dense_canonical_spectrum
from hkd_core.koopman import tau_of_sigma
from hkd_core.models import build_model


def _kdm(tiny_cfg):
    torch.manual_seed(0)
    m = build_model("kdm", tiny_cfg).eval()
    with torch.no_grad():  # a generic generator, as after training (at initialisation it is 0)
        m.generator.copy_(torch.randn(tiny_cfg.kdm_dim, tiny_cfg.kdm_dim) * 0.5)
    return m


def _moved(m, a: float, b: float):
    """The same model moved along its gauge orbit by C = a G + b I (a polynomial in G, so it commutes with G):
    generator G + C, latent exp(C (tau - 1)) z."""
    moved = copy.deepcopy(m)
    c = a * m.generator.detach() + b * torch.eye(len(m.generator))
    with torch.no_grad():
        moved.generator.add_(c)
    latent = m.latent

    def gauged(x, sigma):
        from hkd_core.edm import as_sigma

        t = (tau_of_sigma(as_sigma(sigma, x).flatten()) - 1)[:, None, None]
        return (torch.matrix_exp(c[None] * t) @ latent(x, sigma)[:, :, None])[:, :, 0]

    moved.latent = gauged
    return moved


def _images(n=96):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1


def _same_set(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Every eigenvalue of a has one of b within tol (and the reverse): the same set in any order."""
    d = (a[:, None] - b[None, :]).abs()
    return bool((d.min(1).values < tol).all() and (d.min(0).values < tol).all())


def test_a_dense_generators_gauge_leaves_the_outputs_and_the_canonical_spectrum_unchanged(tiny_cfg):
    m = _kdm(tiny_cfg)
    moved = _moved(m, a=0.3, b=-0.7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    sigma = torch.exp(torch.empty(6).uniform_(-2, 3, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(
            moved(x * sigma.view(-1, 1, 1, 1), sigma), m(x * sigma.view(-1, 1, 1, 1), sigma)
        )
    raw, raw_moved = m.spectrum()[0], moved.spectrum()[0]
    assert not _same_set(raw, raw_moved, 0.1)  # the eigenvalues as trained moved with the gauge
    images = _images()
    a = dense_canonical_spectrum(m, images, torch.Generator().manual_seed(1))
    b = dense_canonical_spectrum(moved, images, torch.Generator().manual_seed(1))
    assert a.shape == (tiny_cfg.kdm_dim,) and _same_set(a, b, 1e-3)  # the canonical ones did not
    assert not _same_set(a, raw, 1e-2)  # and the canonical gauge is not the trained one
    # conjugate pairs stay pairs (the shifted generator is still real), real eigenvalues stay real
    assert _same_set(a, a.conj(), 1e-4)
    real = raw.imag.abs() < 1e-6
    assert torch.all(a[real].imag == 0)


def test_canonical_spectrum_takes_a_kdm_model(tiny_cfg):
    """What the evaluate stage calls on every model: a KDM model gets its one dense canonical spectrum (it has no
    per-level encoder to take HKD's path)."""
    m = _kdm(tiny_cfg)
    spec = canonical_spectrum(m, _images(32), torch.Generator().manual_seed(1))
    assert len(spec) == 1 and spec[0].shape == (tiny_cfg.kdm_dim,)
    torch.testing.assert_close(
        spec[0], dense_canonical_spectrum(m, _images(32), torch.Generator().manual_seed(1))
    )
