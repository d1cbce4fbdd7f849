"""Koopman spectra and interventions on them (DESIGN 1.3): summaries, band masking, frequency-aware editing.

Each mode pair is one eigenvalue alpha + i beta. Bands are formed per level and per position by sorting
the modes by their decay rate alpha (band 0 = most negative alpha, the fastest-decaying modes); the bands
of a level partition its modes. A random set of modes of a band's size is the control for every band
intervention. All results are tensors; ``figures.py`` draws them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import metric_names as M
from .koopman import sigma_of_tau
from .models import HKD


def summarize(spectrum: list[torch.Tensor], prefix: str = M.SPECTRA) -> dict[str, float]:
    """Scalars per level: alpha mean/min/max/std, mean |beta|, fraction of growing modes (alpha > 0)."""
    out = {}
    for l, ev in enumerate(spectrum, 1):
        a, b = ev.real.flatten().double(), ev.imag.flatten().double()
        values = {
            "alpha_mean": a.mean(),
            "alpha_min": a.min(),
            "alpha_max": a.max(),
            "alpha_std": a.std(unbiased=False),
            "abs_beta_mean": b.abs().mean(),
            "frac_growing": (a > 0).double().mean(),
            "num_modes": torch.tensor(float(a.numel())),
        }
        out.update({M.spectrum(l, k, prefix): values[k].item() for k in M.SPECTRUM_STATS})
    return out


BAND_ORDERS = ("alpha", "speed")


def band_key(ev: torch.Tensor, order: str = "alpha") -> torch.Tensor:
    """What bands sort modes by: ``alpha`` (the rate itself: band 0 decays fastest, the last band decays slowest
    or, where alpha > 0, grows fastest) or ``speed`` (|alpha| descending: band 0 changes most over the trajectory,
    by decay or by growth, the last band least). The two readings of "fast" and "slow" agree only when every
    alpha < 0."""
    if order == "alpha":
        return ev.real
    if order == "speed":
        return -ev.real.abs()
    raise ValueError(f"band order {order!r}: use one of {', '.join(BAND_ORDERS)}")


def band_masks(spectrum: list[torch.Tensor], n_bands: int = 3, order: str = "alpha") -> list[torch.Tensor]:
    """Per level a bool tensor (n_bands, d/2, h, w): band k holds the k-th slice of modes sorted by ``band_key``
    (by alpha unless ``order="speed"``, where band 0 holds the fastest modes, |alpha| largest, as with alpha when
    every mode decays).

    Sorting is stable, so ties (e.g. every alpha = 0 at initialisation) still split into a partition.
    """
    masks = []
    for ev in spectrum:
        n_modes = ev.shape[0]
        if n_bands > n_modes:
            raise ValueError(
                f"{n_bands} bands need at least {n_bands} modes per position; a level has {n_modes}"
            )
        key = band_key(ev, order)
        rank = key.argsort(dim=0, stable=True).argsort(dim=0, stable=True)  # rank of each mode by its key
        edges = torch.linspace(0, n_modes, n_bands + 1).round().long()
        masks.append(torch.stack([(rank >= edges[k]) & (rank < edges[k + 1]) for k in range(n_bands)]))
    return masks


def _channels(mode_mask: torch.Tensor) -> torch.Tensor:
    """(d/2, h, w) per mode pair -> (d, h, w) per latent channel."""
    return mode_mask.repeat_interleave(2, dim=0)


@torch.no_grad()
def band_masking(model: HKD, x_T: torch.Tensor, n_bands: int = 3, level: int | None = None) -> torch.Tensor:
    """(n_bands, B, C, H, W): decode keeping one band and zeroing the rest, at every level or only at ``level``
    (1-based; the other levels are left whole)."""
    z1 = model.evolve(model.encode(x_T, model.sigma_max), 1.0)
    masks = band_masks(model.spectrum(), n_bands)
    out = []
    for k in range(n_bands):
        zs = [
            z * _channels(m[k]).to(z) if level is None or level == l + 1 else z
            for l, (z, m) in enumerate(zip(z1, masks))
        ]
        out.append(model.decode(zs))
    return torch.stack(out)


def _spatial(mask: torch.Tensor, size: int) -> torch.Tensor:
    """An (H, W) mask in [0, 1] at image resolution, averaged down to (size, size)."""
    m = mask.float()[None, None]
    return F.adaptive_avg_pool2d(m, size)[0, 0]


def band_modes(
    spectrum: list[torch.Tensor], band: int, n_bands: int = 3, order: str = "alpha"
) -> list[torch.Tensor]:
    """Per level the (d/2, h, w) bool modes of band ``band`` (see ``band_masks``)."""
    return [m[band] for m in band_masks(spectrum, n_bands, order)]


def random_modes(like: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per level a random set of modes with as many modes at each position as ``like`` has there: the control
    that tells a band's effect from the effect of blending fewer channels (issue 13)."""
    out = []
    for m in like:
        count = m.sum(0, keepdim=True)  # (1, h, w) modes per position
        rank = torch.rand(m.shape, generator=generator).argsort(0).argsort(0)
        out.append(rank < count)
    return out


def reference_state(
    images: torch.Tensor, tau_mid: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A reference's own state at sigma(tau_mid): the image plus Gaussian noise of that sigma (how the forward
    process reaches it; the teacher's trajectory through a generated image is the other way to get one)."""
    sigma = float(sigma_of_tau(tau_mid))
    return images + sigma * torch.randn(images.shape, generator=generator).to(images)


def blend(
    z: list[torch.Tensor],
    z_ref: list[torch.Tensor],
    mask: torch.Tensor,
    ratio: float,
    modes: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """z + r w (z_ref - z) per level, with w the spatial ``mask`` (H, W) averaged to the level's size, times the
    chosen ``modes`` (per level (d/2, h, w) bools; None: every mode)."""
    out = []
    for l, (a, b) in enumerate(zip(z, z_ref)):
        w = _spatial(mask, a.shape[-1]).to(a)
        if modes is not None:
            w = w * _channels(modes[l]).to(a)
        out.append(a + ratio * w * (b - a))
    return out


@torch.no_grad()
def edit(
    model: HKD,
    x_T: torch.Tensor,
    ref_state: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    modes: list[torch.Tensor] | None = None,
    tau_mid: float = 0.5,
) -> torch.Tensor:
    """Frequency-aware editing (DESIGN 1.3): the sample's latent at tau_mid, evolve(E(x_T, sigma_max), tau_mid),
    takes ``modes`` of the reference's latent E(ref_state, sigma(tau_mid)) inside the spatial ``mask`` with ratio
    r; the blend evolves to tau = 1 and is decoded.

    ``ref_state`` is the reference's **own** state at sigma(tau_mid) (``reference_state``): encoding it is what
    makes tau_mid matter. Blending two latents that both come from evolving encodings of x_T would not: the
    evolution is linear and acts per mode and position, so it commutes with the blend, and every tau_mid gives
    the same image (``tests/hkd_core/test_spectra.py`` asserts both). r = 0 returns the unedited sample.
    """
    z = model.evolve(model.encode(x_T, model.sigma_max), tau_mid)
    z_ref = model.encode(ref_state, sigma_of_tau(tau_mid).expand(ref_state.shape[0]).to(ref_state.device))
    return model.decode(model.evolve(blend(z, z_ref, mask, ratio, modes), 1.0 - tau_mid))


@torch.no_grad()
def band_trajectory(model: HKD, x_T: torch.Tensor, taus: list[float], n_bands: int = 3) -> torch.Tensor:
    """(len(taus), n_bands + 1, B, C, H, W): at each tau, the decoded latent z_tau keeping each band alone,
    then all bands. Shows how each band's contribution builds up along the trajectory."""
    z0 = model.encode(x_T, model.sigma_max)
    masks = band_masks(model.spectrum(), n_bands)
    rows = []
    for t in taus:
        zt = model.evolve(z0, t)
        row = [model.decode([z * _channels(m[k]).to(z) for z, m in zip(zt, masks)]) for k in range(n_bands)]
        row.append(model.decode(zt))
        rows.append(torch.stack(row))
    return torch.stack(rows)


RINGS = ("low", "mid", "high")


def radial_energies(images: torch.Tensor, n_rings: int = 3) -> torch.Tensor:
    """(B, n_rings) each image's energy (|FFT|^2 summed over channels) in rings of spatial frequency: equal
    slices of [0, Nyquist] (0.5 cycles/pixel), the corners above Nyquist in the last ring."""
    h, w = images.shape[-2:]
    power = torch.fft.fft2(images.double()).abs().square().sum(dim=1)  # (B, H, W)
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    radius = (fy[:, None].square() + fx[None, :].square()).sqrt()
    ring = (radius / (0.5 / n_rings)).floor().long().clamp(max=n_rings - 1)
    return torch.stack([power[:, ring == k].sum(1) for k in range(n_rings)], 1)


def radial_shares(images: torch.Tensor, n_rings: int = 3) -> torch.Tensor:
    """(n_rings,) the share of the images' energy (|FFT|^2 summed over batch and channels) in each ring of
    ``radial_energies``."""
    energy = radial_energies(images.reshape(-1, *images.shape[-3:]), n_rings).sum(0)
    return (energy / energy.sum().clamp_min(1e-30)).float()


def shares_interval(
    energies: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> torch.Tensor:
    """(n_rings, 2) percentile bootstrap intervals of the shares sum(E) / sum(E total) over the samples (rows of
    ``energies``, (B, n_rings)), the samples drawn with replacement."""
    g = torch.Generator().manual_seed(seed)
    e = energies.double()
    pick = e[torch.randint(0, e.shape[0], (resamples, e.shape[0]), generator=g)].sum(1)  # (resamples, rings)
    shares = pick / pick.sum(1, keepdim=True).clamp_min(1e-30)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(shares, q, dim=0).T.float()


@torch.no_grad()
def band_frequency_shares(
    model: HKD,
    x_T: torch.Tensor,
    n_bands: int = 3,
    controls: int = 4,
    generator: torch.Generator | None = None,
    order: str = "alpha",
) -> dict[str, torch.Tensor]:
    """What each band contributes to the image, in spatial frequencies: for band k the difference between the
    decoded final latent and the same latent with band k zeroed, split into low/mid/high radial frequency
    shares (``radial_shares``); beside it the same for ``controls`` random mode sets of the band's size (mean and
    std over the draws), and the samples' own shares. Returns {"band": (n_bands, 3), "random": (n_bands, 3),
    "random_std": (n_bands, 3), "image": (3,)}, and bootstrap 95 % intervals over the samples: "band_ci" and
    "random_ci" (n_bands, 3, 2), "image_ci" (3, 2)."""
    z1 = model.evolve(model.encode(x_T, model.sigma_max), 1.0)
    full = model.decode(z1)
    masks = band_masks(model.spectrum(), n_bands, order)

    def removed(modes: list[torch.Tensor]) -> torch.Tensor:
        return full - model.decode([z * (1 - _channels(m).to(z)) for z, m in zip(z1, modes)])

    band, rand, spread, band_ci, rand_ci = [], [], [], [], []
    for k in range(n_bands):
        modes = [m[k] for m in masks]
        e_band = radial_energies(removed(modes))
        band.append(radial_shares(removed(modes)))
        band_ci.append(shares_interval(e_band))
        e_draws = [radial_energies(removed(random_modes(modes, generator))) for _ in range(controls)]
        draws = torch.stack([(e.sum(0) / e.sum().clamp_min(1e-30)).float() for e in e_draws])
        rand.append(draws.mean(0))
        rand_ci.append(shares_interval(torch.stack(e_draws).mean(0)))
        spread.append(draws.std(0) if controls > 1 else torch.zeros(len(RINGS)))
    return {
        "band": torch.stack(band),
        "random": torch.stack(rand),
        "random_std": torch.stack(spread),
        "image": radial_shares(full),
        "band_ci": torch.stack(band_ci),
        "random_ci": torch.stack(rand_ci),
        "image_ci": shares_interval(radial_energies(full)),
    }


def wasserstein1(a: torch.Tensor, b: torch.Tensor, grid: int = 2048) -> float:
    """W1 between two empirical distributions of real numbers: the mean |quantile difference| over ``grid``
    evenly spaced levels (exact for equal sizes when grid is their size)."""
    q = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    return (
        (torch.quantile(a.flatten().double(), q) - torch.quantile(b.flatten().double(), q))
        .abs()
        .mean()
        .item()
    )


def spectrum_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[dict[str, float]]:
    """Per level: how far apart two runs' decay-rate (alpha) distributions are, W1, against their spread (the
    pooled std of alpha): ``w1_over_std`` near 0 means the same spectrum, near 1 means as far apart as the
    modes are spread. The same for beta. Levels are compared in order; their counts must agree."""
    if len(a) != len(b):
        raise ValueError(f"the spectra have {len(a)} and {len(b)} levels; compare runs of the same levels")
    out = []
    for ea, eb in zip(a, b):
        row = {}
        for part, f in (("alpha", lambda e: e.real), ("beta", lambda e: e.imag)):
            x, y = f(ea).flatten().double(), f(eb).flatten().double()
            w1 = wasserstein1(x, y, min(4096, max(x.numel(), y.numel())))
            spread = torch.cat([x - x.mean(), y - y.mean()]).square().mean().sqrt().item()
            row.update(
                {f"{part}_w1": w1, f"{part}_spread": spread, f"{part}_w1_over_std": w1 / max(spread, 1e-12)}
            )
        out.append(row)
    return out


def band_share_metrics(
    model: HKD, n: int = 16, n_bands: int = 3, controls: int = 4, seed: int = 0
) -> dict[str, float]:
    """``band_frequency_shares`` on ``n`` seeded samples as flat metrics (metric_names.band_share): for each band
    and its random control the low/mid/high shares of what removing it changes, and the samples' own."""
    n_bands = min(n_bands, min(ev.shape[0] for ev in model.spectrum()))
    g = torch.Generator().manual_seed(seed)
    x_T = model.noise(n, g)
    shares = band_frequency_shares(model, x_T, n_bands, controls, g)
    out = {M.band_share("image", None, r): shares["image"][i].item() for i, r in enumerate(RINGS)}
    for kind in ("band", "random"):
        for k in range(n_bands):
            out.update({M.band_share(kind, k, r): shares[kind][k, i].item() for i, r in enumerate(RINGS)})
    return out
