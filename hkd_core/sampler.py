"""Deterministic PF-ODE samplers on the Karras schedule (EDM, Karras et al. 2022, Alg. 1 without churn).

Every sampler has the same signature, ``sample_x(denoise, x, sigmas, callback=None, keep_states=True)``,
and returns a ``Trajectory``: every state (x_T first, x_0 last), its sigma grid and the NFE spent.
``denoise`` is any ``(x, sigma) -> x0_hat`` callable, e.g. ``teacher.denoise``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .edm import SIGMA_MAX, SIGMA_MIN

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class Trajectory:
    states: torch.Tensor  # (S + 1, B, *shape), or (1, B, *shape) holding only x_0 when keep_states=False
    sigmas: torch.Tensor  # (S + 1,), decreasing, last entry 0
    nfe: int

    @property
    def x0(self) -> torch.Tensor:
        return self.states[-1]


def karras_sigmas(
    n_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0
) -> torch.Tensor:
    """n_steps noise levels from sigma_max down to sigma_min (EDM eq. 5), then a final 0; float64."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    i = torch.arange(n_steps, dtype=torch.float64)
    if n_steps == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        s = (a + i / (n_steps - 1) * (b - a)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def _run(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, heun: bool, callback, keep_states: bool
) -> Trajectory:
    sig = [float(s) for s in sigmas]
    states = [x] if keep_states else []
    nfe = 0
    for i, (s_cur, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        d_cur = (x - denoise(x, s_cur)) / s_cur
        nfe += 1
        x_next = x + (s_next - s_cur) * d_cur
        if heun and s_next > 0:  # second-order correction, except on the last step to sigma = 0
            d_next = (x_next - denoise(x_next, s_next)) / s_next
            nfe += 1
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
        if keep_states:
            states.append(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s_cur, "sigma_next": s_next, "nfe": nfe})
    if not keep_states:
        states = [x]
    return Trajectory(torch.stack(states), sigmas.clone(), nfe)


@torch.no_grad()
def sample_heun(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback=None, keep_states: bool = True
) -> Trajectory:
    """Heun's 2nd-order method (2N - 1 NFE for N steps: the last step is Euler to sigma = 0)."""
    return _run(denoise, x, sigmas, True, callback, keep_states)


@torch.no_grad()
def sample_euler(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback=None, keep_states: bool = True
) -> Trajectory:
    """Euler's method (N NFE for N steps)."""
    return _run(denoise, x, sigmas, False, callback, keep_states)


SAMPLERS = {"heun": sample_heun, "euler": sample_euler}


def steps_for_nfe(nfe: int) -> tuple[str, int]:
    """The sampler and step count that spend exactly ``nfe`` evaluations: Heun when nfe is odd, else Euler."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return ("heun", (nfe + 1) // 2) if nfe % 2 else ("euler", nfe)


def sample_nfe(denoise: Denoise, x_T: torch.Tensor, nfe: int, **schedule) -> Trajectory:
    """Sample with exactly ``nfe`` teacher evaluations (x_T already scaled by sigma_max)."""
    name, n = steps_for_nfe(nfe)
    return SAMPLERS[name](denoise, x_T, karras_sigmas(n, **schedule), keep_states=False)
