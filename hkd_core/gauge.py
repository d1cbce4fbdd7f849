"""The Koopman spectrum's gauge freedom, the conditions that fix it, and the comparison of two spectra (issue 24).

**The symmetry.** HKD decodes D(evolve(E(x, sigma), tau(sigma) -> 1)). For any per-mode constants c (real)
and theta (an angle rate), the encoder

    E'_k(x, sigma) = exp(c_k (tau - 1)) R(theta_k (tau - 1)) E_k(x, sigma),   tau = tau(sigma)

with alpha'_k = alpha_k + c_k and beta'_k = beta_k + theta_k decodes every input identically (the gain and
the rotation it adds are undone by the extra evolution to tau = 1). Both sides of the latent-consistency
residual pick up the same factor exp(c_k (tau_s - 1)) per mode: a zero residual stays zero, and with one c for
every mode the (relative) residual is unchanged; a per-mode c only reweights the modes in it. A
sigma-conditioned encoder can learn that gain, so the learned alpha (and beta) carries an arbitrary offset
per mode: ``gauge_transform`` builds the transformed model, and tests/hkd_core/test_gauge.py shows that it
scores the same.

**Two ways to fix it.**
- ``model.observables=state``: the Koopman observables are functions of the state alone (the encoder sees x,
  scaled by its own RMS, and a fixed noise embedding, never sigma). A tau-dependent gain is then not
  representable at a fixed state: ``gauge_transform`` of such a model depends on sigma, which the model
  cannot express.
- ``train.gauge_weight`` > 0: a gauge condition in the loss. For states x of the batch encoded at their own
  sigma and at a shifted sigma' (tau' = tau +- GAUGE_DTAU), each mode's mean log-energy slope
  d log|E_k|^2 / d tau and mean phase slope at a fixed state are driven to zero (``gauge_penalty``): the
  encoder's explicit clock carries no net gain or rotation, so every growth or decay of a mode along a
  trajectory is alpha's. Under the transformation the slopes move by 2 c_k and theta_k, so exactly one
  member of each orbit satisfies the condition.

**Comparing spectra.** Modes within a position are interchangeable (any permutation of the pairs, with the
lift permuted alike, is the same model), and a pair read in the other order has beta of the other sign.
``match_modes`` pairs the modes of two models per position (a Hungarian match on (centred alpha, |beta|), or
by sorting on alpha) before ``spectrum_agreement`` compares them per (level, mode, position): correlation and
mean difference of alpha, with the W1 distance of the marginals kept as a second number.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .koopman import sigma_of_tau, tau_of_sigma

GAUGE_DTAU = 0.25  # tau' - tau for the gauge condition's second encoding


def _pair_gain(z: torch.Tensor, c: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """exp(c t) R(theta t) applied to each mode pair of z (B, d, h, w); c, theta (d/2,) or (d/2, h, w); t (B,)."""
    b, d = z.shape[:2]
    p = z.reshape(b, d // 2, 2, *z.shape[2:])
    t = t.reshape(-1, 1, *([1] * (z.ndim - 2))).to(z)

    def per_mode(v):  # (d/2,): one value per mode; (d/2, h, w): one per mode and position
        return v.to(z).reshape(1, -1, *([1] * (z.ndim - 2))) if v.ndim == 1 else v.to(z).unsqueeze(0)

    scale, ang = torch.exp(per_mode(c) * t), per_mode(theta) * t
    cos, sin = torch.cos(ang), torch.sin(ang)
    re, im = p[:, :, 0], p[:, :, 1]
    return torch.stack([scale * (cos * re - sin * im), scale * (sin * re + cos * im)], 2).reshape(z.shape)


class _GaugedEncoder:
    """E' = exp(c (tau - 1)) R(theta (tau - 1)) E, per level (what ``gauge_transform`` installs as the model's
    ``encode``; a plain callable, so that it shadows the method)."""

    def __init__(self, encode, cs: list[torch.Tensor], thetas: list[torch.Tensor]):
        self._encode, self.cs, self.thetas = encode, cs, thetas

    def __call__(self, x: torch.Tensor, sigma) -> list[torch.Tensor]:
        from .edm import as_sigma

        s = as_sigma(sigma, x).flatten()
        t = tau_of_sigma(s).to(x.device) - 1
        return [_pair_gain(z, c, th, t) for z, c, th in zip(self._encode(x, s), self.cs, self.thetas)]


def gauge_transform(
    model: nn.Module, cs: list[torch.Tensor], thetas: list[torch.Tensor] | None = None
) -> nn.Module:
    """A copy of an HKD model moved along the gauge orbit: per level l and mode k (c[l] of shape (d/2,)) or mode and
    position (c[l] of shape (d/2, h, w)), alpha + c, beta + theta, and the encoder multiplied by
    exp(c (tau - 1)) R(theta (tau - 1)). It computes the same outputs and latents' residuals as ``model`` (for
    observables of the state alone the encoder it installs then depends on sigma, which such a model could not
    learn, but it still computes the same)."""
    m = copy.deepcopy(model)
    thetas = thetas or [torch.zeros_like(c) for c in cs]
    with torch.no_grad():
        for k, c, th in zip(m.koopman, cs, thetas):
            c = (c.view(-1, 1, 1) if c.ndim == 1 else c).to(k.alpha)
            th = (th.view(-1, 1, 1) if th.ndim == 1 else th).to(k.beta)
            rate = k.rates() + c
            if k.alpha_bound:
                if (rate.abs() >= k.alpha_bound).any():
                    raise ValueError(
                        f"gauge_transform: alpha + c reaches the bound {k.alpha_bound} "
                        f"(max |alpha + c| = {rate.abs().max():.3g}); use an unbounded model"
                    )
                k.alpha.copy_(k.alpha_bound * torch.atanh(rate / k.alpha_bound))
            else:
                k.alpha.copy_(rate.expand_as(k.alpha))
            k.beta.copy_((k.beta + th).expand_as(k.beta))
    m.encode = _GaugedEncoder(m.encode, cs, thetas)
    return m


def offset_alpha(model: nn.Module, offsets: list[torch.Tensor]) -> None:
    """Start alpha at a per-mode offset (level l, mode k: + offsets[l][k]) and scale the decoder's lift of that
    mode by exp(-offset), so that the model's map at sigma_max (tau = 0 -> 1) is unchanged: two runs that start
    at offsets 0 and c compute the same samples at initialisation and differ only in alpha (the gauge
    experiment of issue 24)."""
    with torch.no_grad():
        for k, l, off in zip(model.koopman, model.levels, offsets):
            off = off.to(k.alpha)
            rate = k.rates() + off.view(-1, 1, 1)
            if k.alpha_bound:
                rate = rate.clamp(-0.999 * k.alpha_bound, 0.999 * k.alpha_bound)
                k.alpha.copy_(k.alpha_bound * torch.atanh(rate / k.alpha_bound))
            else:
                k.alpha.copy_(rate.expand_as(k.alpha))
            lift = model.decoder.lift[l]
            lift.weight.mul_(torch.exp(-off).repeat_interleave(2).view(1, -1, 1, 1).to(lift.weight))


def alpha_offsets(
    model: nn.Module, offset: float = 0.0, spread: float = 0.0, seed: int = 0
) -> list[torch.Tensor]:
    """Per level a (d/2,) offset: ``offset`` for every mode plus a uniform draw in [-spread, spread] per mode."""
    return offset_draw([k.dim // 2 for k in model.koopman], offset, spread, seed)


def offset_draw(
    modes: list[int], offset: float = 0.0, spread: float = 0.0, seed: int = 0
) -> list[torch.Tensor]:
    """The offsets of ``alpha_offsets`` from the number of modes per level alone (to read a run's start again)."""
    g = torch.Generator().manual_seed(seed)
    return [offset + spread * (2 * torch.rand(n, generator=g) - 1) for n in modes]


def offset_survival(
    alpha0: list[torch.Tensor], alpha: list[torch.Tensor], offsets: list[torch.Tensor]
) -> list[float]:
    """Per level, how much of a start offset of alpha is still there after training: the least-squares slope
    (through 0) of the learned difference per mode (alpha - alpha0, mode k with mode k, averaged over positions;
    both runs start from the same tensors but for the offset) on the offset it started with. 1: the offset
    survived whole, as the gauge says it may under a loss that cannot see it; 0: training removed it."""
    out = []
    for a0, a, off in zip(alpha0, alpha, offsets):
        d = (a.double() - a0.double()).reshape(a.shape[0], -1).mean(1)
        off = off.double()
        out.append(float((d * off).sum() / off.square().sum()) if off.abs().sum() > 0 else float("nan"))
    return out


def shifted_sigma(
    sigma: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma', tau' - tau): tau' = tau +- GAUGE_DTAU, the sign drawn per row and turned round where it would
    leave [0, 1]."""
    tau = tau_of_sigma(sigma).to(sigma.device)
    sign = torch.where(torch.rand(tau.shape, generator=generator) < 0.5, -1.0, 1.0).to(tau)
    t2 = tau + sign * GAUGE_DTAU
    sign = torch.where((t2 < 0) | (t2 > 1), -sign, sign)
    t2 = tau + sign * GAUGE_DTAU
    return sigma_of_tau(t2).to(sigma), t2 - tau


def gauge_penalty(
    z: list[torch.Tensor], z_shifted: list[torch.Tensor], dtau: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The gauge condition's residual: per level, mode and position, the batch mean of the log-energy slope
    (log|z'_k|^2 - log|z_k|^2) / dtau and of the phase slope angle(z'_k conj z_k) / dtau of the same states
    encoded at two noise levels; their squares averaged over modes and positions, summed over levels. Zero
    when the encoder's noise-level input carries no net per-mode gain or rotation."""
    total = torch.zeros((), device=dtau.device)
    for gain, phase in encoder_slopes(z, z_shifted, dtau, eps):
        total = total + gain.square().mean() + phase.square().mean()
    return total


def encoder_slopes(
    z: list[torch.Tensor], z_shifted: list[torch.Tensor], dtau: torch.Tensor, eps: float = 1e-6
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level (d/2, h, w) the batch means of the log-energy slope and of the phase slope of each mode at a
    fixed state, encoded at two noise levels dtau apart (what ``gauge_penalty`` drives to zero). Moving a model
    along the gauge orbit by (c, theta) moves them by exactly 2 c and theta."""
    out = []
    for gain, angle, dt in _pair_terms(z, z_shifted, dtau, eps):
        out.append((gain.mean(0), (angle / dt).mean(0)))
    return out


def _pair_terms(z, z_shifted, dtau, eps):
    """Per level and state: the log-energy slope of each mode, its rotation angle from z to z_shifted, and dtau
    shaped to broadcast."""
    for a, b in zip(z, z_shifted):
        n, d = a.shape[:2]
        pa = a.reshape(n, d // 2, 2, *a.shape[2:]).float()
        pb = b.reshape(n, d // 2, 2, *b.shape[2:]).float()
        ea, eb = pa.square().sum(2), pb.square().sum(2)
        dt = dtau.reshape(-1, *([1] * (ea.ndim - 1))).to(ea)
        gain = ((eb + eps).log() - (ea + eps).log()) / dt
        # the rotation from a to b: Im(b conj a) / |a||b| = sin(angle), per state
        cross = (pb[:, :, 1] * pa[:, :, 0] - pb[:, :, 0] * pa[:, :, 1]) / (ea * eb + eps).sqrt()
        dot = (pb[:, :, 0] * pa[:, :, 0] + pb[:, :, 1] * pa[:, :, 1]) / (ea * eb + eps).sqrt()
        yield gain, torch.atan2(cross, dot), dt


@torch.no_grad()
def canonical_gauge(
    model: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 64
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gauge that the condition picks, found after training instead of imposed during it: per level the
    (c, theta) of shape (d/2, h, w) that bring the encoder's mean log-energy and phase slopes at a fixed state to
    zero, measured on ``images`` (clean, in [-1, 1]) noised to states at tau drawn uniformly in [0, 1 - dtau]
    and encoded at their own sigma and at tau + ``GAUGE_DTAU``. ``gauge_transform(model, c, theta)`` is then the
    same model (same outputs) whose alpha and beta mean one thing: every growth or decay of a mode along a
    trajectory is alpha's, none of it the encoder's clock. Two models that differ only by a gauge have the same
    canonical spectrum, whatever the states measured on."""
    sums: list[list[torch.Tensor]] | None = None
    n = 0
    for x, sig, sig2 in _gauge_states(images, generator, batch):
        terms = _pair_terms(
            model.encode(x, sig), model.encode(x, sig2), torch.full_like(sig, GAUGE_DTAU), 1e-6
        )
        # the rotation as a circular mean (the angle of the mean unit phasor): a gauge's theta turns every
        # state's angle by theta dtau, so it turns this mean by exactly as much, where a few states whose angle
        # wraps past pi would bend a plain mean
        parts = [[gain.sum(0), torch.cos(angle).sum(0), torch.sin(angle).sum(0)] for gain, angle, _ in terms]
        sums = parts if sums is None else [[x + y for x, y in zip(acc, p)] for acc, p in zip(sums, parts)]
        n += len(x)
    return ([-acc[0] / n / 2 for acc in sums], [-torch.atan2(acc[2], acc[1]) / GAUGE_DTAU for acc in sums])


def _gauge_states(images: torch.Tensor, generator: torch.Generator | None, batch: int):
    """Batches of (x, sigma, sigma'): ``images`` noised to states at tau drawn uniformly in [0, 1 - dtau], with
    the noise level tau + GAUGE_DTAU to encode the same states at."""
    g = generator or torch.Generator().manual_seed(0)
    for i in range(0, len(images), batch):
        x0 = images[i : i + batch].float()
        tau = torch.rand(len(x0), generator=g) * (1 - GAUGE_DTAU)
        sig, sig2 = sigma_of_tau(tau), sigma_of_tau(tau + GAUGE_DTAU)
        yield x0 + sig.view(-1, *([1] * (x0.ndim - 1))) * torch.randn(x0.shape, generator=g), sig, sig2


@torch.no_grad()
def dense_canonical_spectrum(
    model: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None, batch: int = 64
) -> torch.Tensor:
    """The canonical spectrum of a model with one dense generator G on a flat latent (KDM: exp(G dtau) z, z =
    ``model.latent(x, sigma)``). The same freedom holds in G's eigenbasis: with G = V diag(lam) V^-1 and one
    complex shift mu_k per eigenvalue (conjugate pairs alike, real on real eigenvalues), C = V diag(mu) V^-1 is
    a real matrix that commutes with G, and G + C with the latent exp(C (tau - 1)) z decodes every input
    identically. The canonical member is the one whose mode coordinates w = V^-1 z of the encoded states have
    zero mean log-energy slope and phase slope at a fixed state, as ``canonical_gauge`` asks of HKD's pairs.
    Returns lam + mu, (kdm_dim,) complex."""
    lam, vecs = torch.linalg.eig(model.generator.detach().double())
    inv_t = torch.linalg.inv(vecs).T
    gain = cos = sin = torch.zeros(len(lam), dtype=torch.float64)
    n = 0
    for x, sig, sig2 in _gauge_states(images, generator, batch):
        w1 = model.latent(x, sig).double().to(inv_t.dtype) @ inv_t
        w2 = model.latent(x, sig2).double().to(inv_t.dtype) @ inv_t
        gain = (
            gain + ((w2.abs().square() + 1e-12).log() - (w1.abs().square() + 1e-12).log()).sum(0) / GAUGE_DTAU
        )
        angle = torch.angle(w2 * w1.conj())
        cos, sin = cos + torch.cos(angle).sum(0), sin + torch.sin(angle).sum(0)
        n += len(x)
    theta = -torch.atan2(sin, cos) / GAUGE_DTAU
    # a real eigenvalue's mode may only shift along the real axis (its coordinate is real up to a constant phase)
    theta = torch.where(lam.imag.abs() > 1e-9 * lam.abs().clamp(min=1.0), theta, torch.zeros_like(theta))
    return (lam + torch.complex(-gain / n / 2, theta)).to(torch.complex64)


def canonical_spectrum(
    model: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The model's spectrum in the canonical gauge: per level (d/2, h, w) complex for HKD (``canonical_gauge``),
    one (kdm_dim,) vector for a dense generator (KDM, ``dense_canonical_spectrum``)."""
    if not hasattr(model, "koopman") and hasattr(model, "latent"):
        return [dense_canonical_spectrum(model, images, generator)]
    cs, thetas = canonical_gauge(model, images, generator)
    return [
        ev + torch.complex(c.to(ev.real), th.to(ev.real)) for ev, c, th in zip(model.spectrum(), cs, thetas)
    ]


def match_modes(a: torch.Tensor, b: torch.Tensor, method: str = "hungarian") -> torch.Tensor:
    """For eigenvalues a, b (d/2, h, w) complex, the permutation perm (d/2, h, w) such that b[perm[k, i, j], i, j]
    is the mode of b matched to a[k, i, j]: a Hungarian match per position (scipy) on (alpha less its mean over
    the position's modes, |beta|), so that an offset common to the modes does not steer the match; or ``sort``:
    the k-th smallest alpha with the k-th smallest."""
    if method not in ("hungarian", "sort"):
        raise ValueError(f"match_modes: method {method!r}; use 'hungarian' or 'sort'")
    m, h, w = a.shape
    if method == "sort":
        ra, rb = a.real.argsort(0), b.real.argsort(0)
        perm = torch.empty_like(ra)
        perm.scatter_(0, ra, rb)
        return perm
    from scipy.optimize import linear_sum_assignment

    fa = torch.stack([a.real - a.real.mean(0), a.imag.abs()], -1).double()
    fb = torch.stack([b.real - b.real.mean(0), b.imag.abs()], -1).double()
    perm = torch.empty(m, h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            cost = torch.cdist(fa[:, i, j], fb[:, i, j]).numpy()
            rows, cols = linear_sum_assignment(cost)
            perm[torch.as_tensor(rows), i, j] = torch.as_tensor(cols)
    return perm


def spectrum_agreement(a: list[torch.Tensor], b: list[torch.Tensor], method: str = "hungarian") -> list[dict]:
    """Per level, after matching modes within each position: the Pearson correlation of alpha over every
    (mode, position), the mean and mean absolute difference of alpha (b - a), the correlation of |beta|; and
    without matching (mode k with mode k) the alpha correlation, for reference."""
    out = []
    for ea, eb in zip(a, b):
        perm = match_modes(ea, eb, method)
        mb = torch.gather(eb, 0, perm)
        xa, xb = ea.real.flatten().double(), mb.real.flatten().double()
        out.append(
            {
                "alpha_corr": _corr(xa, xb),
                "alpha_mean_diff": (xb - xa).mean().item(),
                "alpha_mean_abs_diff": (xb - xa).abs().mean().item(),
                "abs_beta_corr": _corr(ea.imag.abs().flatten().double(), mb.imag.abs().flatten().double()),
                "alpha_corr_unmatched": _corr(xa, eb.real.flatten().double()),
                "modes": int(xa.numel()),
            }
        )
    return out


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else float("nan")
