"""Koopman generators with block-diagonal structure and their closed-form evolution (HKD, DESIGN 1.2).

A level's latent z has d channels, read as d/2 pairs (2k, 2k+1). Pair k at position (i, j) evolves under
the block [[alpha, -beta], [beta, alpha]], i.e. the eigenvalue pair alpha +- i beta. Over dtau the block's
exponential is exp(alpha dtau) times a rotation by beta dtau, so evolution is elementwise: no matrix
exponential routine, no iteration.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .edm import SIGMA_MAX, SIGMA_MIN

OPERATORS = ("position", "shared", "none")


def tau_of_sigma(
    sigma: torch.Tensor | float, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX
) -> torch.Tensor:
    """Normalised time: 0 at sigma_max (noise end), 1 at sigma_min (data end); sigma = 0 counts as sigma_min."""
    s = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=sigma_min, max=sigma_max)
    return ((math.log(sigma_max) - s.log()) / (math.log(sigma_max) - math.log(sigma_min))).float()


def sigma_of_tau(
    tau: torch.Tensor | float, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX
) -> torch.Tensor:
    t = torch.as_tensor(tau, dtype=torch.float64)
    return (math.log(sigma_max) - t * (math.log(sigma_max) - math.log(sigma_min))).exp().float()


def evolve(
    z: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, dtau: torch.Tensor | float
) -> torch.Tensor:
    """exp(A dtau) z for z (B, d, h, w), alpha/beta broadcastable to (d/2, h, w), dtau scalar or (B,)."""
    b, d = z.shape[:2]
    pairs = z.reshape(b, d // 2, 2, *z.shape[2:])
    zr, zi = pairs[:, :, 0], pairs[:, :, 1]
    t = torch.as_tensor(dtau, dtype=z.dtype, device=z.device)
    t = t.reshape(-1, *([1] * (zr.ndim - 1))) if t.ndim else t
    scale = torch.exp(alpha * t)
    ang = beta * t
    cos, sin = torch.cos(ang), torch.sin(ang)
    out = torch.stack([scale * (cos * zr - sin * zi), scale * (sin * zr + cos * zi)], dim=2)
    return out.reshape(z.shape)


class KoopmanOperator(nn.Module):
    """One level's generator: per position ('position'), shared across positions ('shared'), or absent ('none').

    'none' is the no-Koopman-evolution ablation (A = 0): evolution is the identity and there are no
    parameters. alpha and beta start at 0, so every variant starts as the identity.

    ``alpha_bound`` B > 0 bounds the decay rates: the stored parameter ``alpha`` is then a raw value rho and the
    rate is ``B tanh(rho / B)``, in (-B, B), equal to rho near 0 (so B = 0, unbounded, and a large B agree
    where |rho| << B). Without a bound the encoder can trade any shift of alpha for a rescaling of its output
    (issue 13), and alpha can run off; ``rates()`` is the alpha that evolution uses.
    """

    def __init__(self, dim: int, height: int, width: int, mode: str = "position", alpha_bound: float = 0.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Koopman subspace dimension must be even, got {dim}")
        if mode not in OPERATORS:
            raise ValueError(f"operator mode {mode!r} is not one of {OPERATORS}")
        if alpha_bound < 0:
            raise ValueError(f"alpha_bound must be >= 0 (0: unbounded), got {alpha_bound}")
        self.dim, self.mode, self.alpha_bound = dim, mode, float(alpha_bound)
        shape = (dim // 2, height, width) if mode == "position" else (dim // 2, 1, 1)
        if mode == "none":
            self.register_buffer("alpha", torch.zeros(shape))
            self.register_buffer("beta", torch.zeros(shape))
        else:
            self.alpha = nn.Parameter(torch.zeros(shape))
            self.beta = nn.Parameter(torch.zeros(shape))
        self.height, self.width = height, width

    def rates(self) -> torch.Tensor:
        """The decay rates alpha that evolution uses: the parameter itself, or B tanh(rho / B) under a bound."""
        if self.alpha_bound > 0:
            return self.alpha_bound * torch.tanh(self.alpha / self.alpha_bound)
        return self.alpha

    def forward(self, z: torch.Tensor, dtau: torch.Tensor | float) -> torch.Tensor:
        if self.mode == "none":
            return z
        return evolve(z, self.rates(), self.beta, dtau)

    def eigenvalues(self) -> torch.Tensor:
        """alpha + i beta, one per mode pair, expanded to (d/2, h, w) (the conjugate is implied)."""
        shape = (self.dim // 2, self.height, self.width)
        return torch.complex(
            self.rates().detach().expand(shape).float(), self.beta.detach().expand(shape).float()
        )

    def extra_repr(self) -> str:
        bound = f", alpha_bound={self.alpha_bound:g}" if self.alpha_bound else ""
        return f"dim={self.dim}, size={self.height}x{self.width}, mode={self.mode}{bound}"
