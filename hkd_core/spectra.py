"""Koopman spectra and interventions on them (DESIGN 1.3): summaries, band masking, frequency-aware editing.

Each mode pair is one eigenvalue alpha + i beta. Bands are formed per level and per position by sorting
the modes by their decay rate alpha (band 0 = most negative alpha, the fastest-decaying modes); the bands
of a level partition its modes. All results are tensors; ``figures.py`` draws them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import metric_names as M
from .models import HKD


def summarize(spectrum: list[torch.Tensor], prefix: str = M.SPECTRA) -> dict[str, float]:
    """Scalars per level: alpha mean/min/max/std, mean |beta|, fraction of growing modes (alpha > 0)."""
    out = {}
    for l, ev in enumerate(spectrum, 1):
        a, b = ev.real.flatten().double(), ev.imag.flatten().double()
        values = {"alpha_mean": a.mean(), "alpha_min": a.min(), "alpha_max": a.max(),
                  "alpha_std": a.std(unbiased=False), "abs_beta_mean": b.abs().mean(),
                  "frac_growing": (a > 0).double().mean(), "num_modes": torch.tensor(float(a.numel()))}
        out.update({M.spectrum(l, k, prefix): values[k].item() for k in M.SPECTRUM_STATS})
    return out


def band_masks(spectrum: list[torch.Tensor], n_bands: int = 3) -> list[torch.Tensor]:
    """Per level a bool tensor (n_bands, d/2, h, w): band k holds the k-th slice of modes sorted by alpha.

    Sorting is stable, so ties (e.g. every alpha = 0 at initialisation) still split into a partition.
    """
    masks = []
    for ev in spectrum:
        n_modes = ev.shape[0]
        if n_bands > n_modes:
            raise ValueError(f"{n_bands} bands need at least {n_bands} modes per position; a level has {n_modes}")
        rank = ev.real.argsort(dim=0, stable=True).argsort(dim=0, stable=True)       # rank of each mode by alpha
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
        zs = [z * _channels(m[k]).to(z) if level is None or level == l + 1 else z
              for l, (z, m) in enumerate(zip(z1, masks))]
        out.append(model.decode(zs))
    return torch.stack(out)


def _spatial(mask: torch.Tensor, size: int) -> torch.Tensor:
    """An (H, W) mask in [0, 1] at image resolution, averaged down to (size, size)."""
    m = mask.float()[None, None]
    return F.adaptive_avg_pool2d(m, size)[0, 0]


@torch.no_grad()
def edit(model: HKD, x_T: torch.Tensor, x_T_ref: torch.Tensor, mask: torch.Tensor, ratio: float,
         band: int | None = None, tau_mid: float = 0.5, n_bands: int = 3) -> torch.Tensor:
    """Frequency-aware editing: at tau_mid blend band ``band`` of the reference's latent into the sample's
    inside the spatial ``mask`` (H, W) with ratio r, evolve to tau = 1, decode.

    ``band=None`` blends all bands at once: the baseline that loses the sample's global structure.
    r = 0 returns the unedited sample.
    """
    z = model.evolve(model.encode(x_T, model.sigma_max), tau_mid)
    z_ref = model.evolve(model.encode(x_T_ref, model.sigma_max), tau_mid)
    masks = band_masks(model.spectrum(), n_bands) if band is not None else None
    mixed = []
    for l, (a, b) in enumerate(zip(z, z_ref)):
        w = _spatial(mask, a.shape[-1]).to(a)
        if masks is not None:
            w = w * _channels(masks[l][band]).to(a)
        mixed.append(a + ratio * w * (b - a))
    return model.decode(model.evolve(mixed, 1.0 - tau_mid))


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
