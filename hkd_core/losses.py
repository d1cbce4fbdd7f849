"""HKD's distillation loss (DESIGN 1.2) and its pluggable distances.

L = sum over t in S of d(model(x_t, sigma_t), x_0): S holds x_T (the reconstruction term) and s - 1 states
drawn from each stored trajectory (the trajectory-consistency term); s = 1 is the no-consistency ablation.
``train.latent_weight`` > 0 adds KDM's latent alignment carried to the hierarchy (issue 13): x_T's latents
evolved to a later state's tau against that state's own encoding (``latent_consistency``).
d = lambda1 * MSE + lambda2 * perceptual, with lambda1 annealed by kimg. The perceptual term defaults to a
pseudo-Huber distance (iCT, Song & Dhariwal 2023); LPIPS plugs in where its weights exist locally.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .koopman import tau_of_sigma

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> per-sample distance (B,)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).square().flatten(1).mean(1)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(sqrt(|x - y|^2 + c^2) - c) / sqrt(dim), c = 0.00054 sqrt(dim).

    Divided by sqrt(dim) (our choice) so that it reads as a per-pixel RMS and sits on MSE's scale.
    """
    dim = x[0].numel()
    c = 0.00054 * math.sqrt(dim)
    return ((x - y).square().flatten(1).sum(1) + c * c).sqrt().sub(c) / math.sqrt(dim)


L1_EPS = 1e-3  # l1's smoothing: below about this per-pixel error it is quadratic, so its gradient exists at 0


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel robust distance (Charbonnier): the mean over pixels of sqrt(d^2 + eps^2) - eps, d = x - y.

    pseudo_huber takes one norm over the whole image, so its gradient is MSE's per pixel, rescaled per sample:
    where the student cannot resolve the teacher's map it regresses to the mean, and the mean is blurry. Per
    pixel, an L1 distance regresses to the median instead (pix2pix's reason for L1). On MSE's first-order scale
    like pseudo_huber: a uniform error of e gives about e.
    """
    return ((x - y).square() + L1_EPS * L1_EPS).sqrt().sub(L1_EPS).flatten(1).mean(1)


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) on VGG-16 features, from local weight files only (nothing is downloaded).

    ``vgg_path``: torchvision's ``vgg16`` state dict; ``lin_path``: the five LPIPS linear heads
    (``lin{0..4}.model.1.weight`` as in the reference release). Images in [-1, 1], 1 or 3 channels.
    """

    _taps = (3, 8, 15, 22, 29)  # relu1_2 .. relu5_3 in vgg16.features
    _shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    _scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def __init__(self, vgg_path: str | os.PathLike, lin_path: str | os.PathLike):
        super().__init__()
        import torchvision

        for p in (vgg_path, lin_path):
            if not Path(p).is_file():
                raise FileNotFoundError(
                    f"LPIPS weights {p} not found; LPIPS needs local weight files "
                    f"(loss.perceptual=pseudo_huber works without any)"
                )
        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(torch.load(vgg_path, map_location="cpu", weights_only=True))
        self.features = vgg.features[: self._taps[-1] + 1].eval().requires_grad_(False)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        self.lins = [lin[f"lin{i}.model.1.weight"] for i in range(5)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        h = torch.cat([x, y])
        h = (h - self._shift.to(h)) / self._scale.to(h)
        total = 0
        taps = iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self._taps:
                fx, fy = h.chunk(2)
                fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
                w = next(taps).to(h)
                total = total + ((fx - fy).square() * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


def unet_levels(net: nn.Module, x: torch.Tensor, sigma: float, sigma_data: float) -> list[torch.Tensor]:
    """Each level's output of a U-Net's down path for images ``x`` taken as states at noise level ``sigma``
    (EDM's c_in and c_noise): the teacher's own features, for the perceptual distance and the discriminator."""
    from .layers import downsample

    s = torch.full((x.shape[0],), sigma, device=x.device)
    emb = net.embed(s.log() / 4)
    h = net.conv_in(x / math.sqrt(sigma**2 + sigma_data**2))
    out = []
    for i, stage in enumerate(net.down):
        h = stage(downsample(h) if i else h, emb)
        out.append(h)
    return out


class TeacherFeatureDistance(nn.Module):
    """A perceptual distance in the frozen teacher's own features (DESIGN 1.2): LPIPS's recipe without its
    VGG weights, which cannot be had offline. Both images go through the teacher U-Net's down path as if they
    were states at noise level ``sigma`` (EDM's c_in and c_noise); at each level's output every position's
    feature vector is scaled to unit length across channels, the squared difference is summed over channels
    and averaged over positions, and the levels are averaged (equal weights: LPIPS's learned heads need
    human judgements we do not have). Never the Inception network: that is the metric.

    ``denoiser``: the teacher, an ``EDMPrecond`` around a ``UNet`` (a copy is kept, frozen)."""

    def __init__(self, denoiser: nn.Module, sigma: float = 0.5):
        super().__init__()
        import copy

        net = getattr(denoiser, "net", None)
        if net is None or not hasattr(net, "down"):
            raise TypeError(
                "train.perceptual=teacher needs the teacher as an EDMPrecond(UNet); got "
                f"{type(denoiser).__name__}"
            )
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.sigma, self.sigma_data = float(sigma), float(denoiser.sigma_data)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [h / (h.square().sum(1, keepdim=True) + 1e-10).sqrt() for h in self.levels(x)]

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return unet_levels(self.net, x, self.sigma, self.sigma_data)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.features(x)
        with torch.set_grad_enabled(y.requires_grad and torch.is_grad_enabled()):
            fy = self.features(y)  # the target needs no graph (it is data)
        return sum((a - b).square().sum(1).mean((1, 2)) for a, b in zip(fx, fy)) / len(fx)


PERCEPTUAL = ("pseudo_huber", "l1", "mse", "teacher", "lpips")


def perceptual_distance(name: str, **kwargs) -> Distance:
    """The distance ``train.perceptual`` names; ``teacher`` takes ``denoiser`` (and ``sigma``), ``lpips`` its two
    weight files."""
    if name == "pseudo_huber":
        return pseudo_huber
    if name == "l1":
        return l1
    if name == "mse":
        return mse
    if name == "teacher":
        return TeacherFeatureDistance(**kwargs)
    if name == "lpips":
        return LPIPS(**kwargs)
    raise ValueError(f"loss.perceptual is {name!r}; allowed: {', '.join(repr(p) for p in PERCEPTUAL)}")


@dataclass
class LambdaSchedule:
    """lambda1 goes linearly from ``start`` to ``end`` over ``anneal_kimg`` (coarse -> perceptual)."""

    start: float = 1.0
    end: float = 0.0
    anneal_kimg: float = 100.0

    def __call__(self, kimg: float) -> float:
        if self.anneal_kimg <= 0:
            return self.end
        return self.start + (self.end - self.start) * min(1.0, kimg / self.anneal_kimg)


class HKDLoss:
    """Reconstruction plus trajectory consistency over stored teacher trajectories.

    ``states``: (B, S+1, *shape) with x_T first and x_0 last; ``sigmas``: (S+1,). ``s`` states per
    trajectory enter the loss: x_T and s - 1 drawn without replacement from the intermediate states
    1..S-1 whose sigma is at least ``tcons_sigma_min`` (0: all of them, the paper's way).

    The loss is the paper's plain sum over the s states when ``xT_weight`` is None (x_T then carries 1/s
    of it); a weight w in (0, 1] gives s * (w d(x_T) + (1 - w) mean of the others), the same scale with
    x_T's share set to w. Returns scalars: ``loss`` (to minimise), ``loss_recon``, ``loss_tcons`` (and
    ``loss_latent`` with ``latent_weight`` > 0); with ``keep_x0`` set, also ``x0``: the student's x_0 for each
    x_T (B, *shape), not detached.
    """

    def __init__(
        self,
        states_per_traj: int = 4,
        lambda1: LambdaSchedule | None = None,
        lambda2: float = 1.0,
        perceptual: Distance = pseudo_huber,
        xT_weight: float | None = None,
        tcons_sigma_min: float = 0.0,
        latent_weight: float = 0.0,
        gauge_weight: float = 0.0,
    ):
        if states_per_traj < 1:
            raise ValueError(f"loss.states_per_traj must be >= 1, got {states_per_traj}")
        if xT_weight is not None and not 0 < xT_weight <= 1:
            raise ValueError(
                f"train.xT_weight must be in (0, 1] (or null: the paper's plain sum), got {xT_weight}"
            )
        if not latent_weight >= 0:
            raise ValueError(
                f"train.latent_weight must be >= 0 (0: no latent-consistency term), got {latent_weight}"
            )
        self.s = states_per_traj
        self.lambda1 = lambda1 or LambdaSchedule()
        self.lambda2, self.perceptual = lambda2, perceptual
        self.xT_weight, self.tcons_sigma_min = xT_weight, tcons_sigma_min
        if not gauge_weight >= 0:
            raise ValueError(f"train.gauge_weight must be >= 0 (0: no gauge condition), got {gauge_weight}")
        self.latent_weight, self.gauge_weight = latent_weight, gauge_weight
        self.keep_x0 = False

    def distance(self, x: torch.Tensor, y: torch.Tensor, kimg: float) -> torch.Tensor:
        l1 = self.lambda1(kimg)
        d = self.lambda2 * self.perceptual(x, y)
        return d + l1 * mse(x, y) if l1 else d

    def columns(self) -> int:
        """States per trajectory that go through the model: s, plus one for the latent term when s = 1."""
        return self.s + (1 if self.latent_weight > 0 and self.s == 1 else 0)

    def candidates(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Indices of the intermediate states a consistency term may use (1..S-1, sigma >= tcons_sigma_min)."""
        inner = torch.arange(1, len(sigmas) - 1)
        keep = inner[sigmas[1:-1].cpu() >= self.tcons_sigma_min]
        if self.columns() - 1 > len(keep):
            raise ValueError(
                f"train.states_per_traj={self.s} needs {self.columns() - 1} intermediate states; the "
                f"trajectories have {len(keep)} with sigma >= train.tcons_sigma_min="
                f"{self.tcons_sigma_min} (of {len(inner)})"
            )
        return keep

    def pick(self, b: int, sigmas: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, columns) state indices: column 0 is x_T (index 0), the rest distinct allowed intermediate states
        (the consistency term's s - 1, or the latent term's one when s = 1)."""
        keep = self.candidates(sigmas)
        cols = [torch.zeros(b, 1, dtype=torch.long)]
        if self.columns() > 1:
            cols.append(
                keep[torch.rand(b, len(keep), generator=generator).argsort(1)[:, : self.columns() - 1]]
            )
        return torch.cat(cols, 1)

    def weights(self) -> torch.Tensor:
        """(s,) per-state weights of the sum: ones (the paper), or x_T's share set to xT_weight."""
        if self.xT_weight is None or self.s == 1:
            return torch.ones(self.s)
        rest = (1 - self.xT_weight) / (self.s - 1)
        return self.s * torch.tensor([self.xT_weight] + [rest] * (self.s - 1))

    def __call__(
        self,
        model: nn.Module,
        states: torch.Tensor,
        sigmas: torch.Tensor,
        kimg: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        b, n = states.shape[:2]
        if n != len(sigmas):
            raise ValueError(f"the trajectories hold {n} states but their sigma grid has {len(sigmas)}")
        idx = self.pick(b, sigmas, generator).to(states.device)  # (B, columns())
        gauge = self.gauge_weight > 0
        if gauge:  # the gauge condition's column: the last state again, at a shifted noise level
            idx = torch.cat([idx, idx[:, -1:]], 1)
        c = idx.shape[1]
        last = c - 1 - gauge  # the latest state of each row
        x = states[torch.arange(b, device=states.device)[:, None], idx]  # (B, c, *shape)
        sig = sigmas.to(states.device, torch.float32)[idx]  # (B, c)
        if gauge:
            from .gauge import shifted_sigma

            shifted, dtau = shifted_sigma(sig[:, -1], generator)
            sig = torch.cat([sig[:, :-1], shifted[:, None]], 1)
        target = states[:, -1].float()
        if self.latent_weight > 0 or gauge:
            # every state's latent evolved to the tau of its row's latest state (column `last`: the smallest
            # sigma of the row when s = 1; any drawn state otherwise), then x_T's against that state's own; the
            # gauge column stays at its own tau (its raw encoding, beside the latest state's raw encoding)
            t_last = tau_of_sigma(sig[:, last : last + 1]).expand(b, c).to(states.device)
            if gauge:
                t_last = torch.cat([t_last[:, :-1], tau_of_sigma(sig[:, -1:]).to(states.device)], 1)
            # only the first s columns are decoded (the extra states are only encoded)
            rows = torch.arange(b * c, device=states.device).view(b, c)[:, : self.s].flatten()
            pred, lat = model(
                x.flatten(0, 1).float(),
                sig.flatten(),
                latent_tau=t_last.flatten(),
                decode=rows if self.s < c else None,
            )
            lat = [z.view(b, c, *z.shape[1:]) for z in lat]
            if self.latent_weight > 0:
                lc = latent_consistency([z[:, 0] for z in lat], [z[:, last] for z in lat])
            if gauge:
                from .gauge import gauge_penalty

                gp = gauge_penalty([z[:, last] for z in lat], [z[:, -1] for z in lat], dtau.to(states.device))
        else:
            pred = model(x.flatten(0, 1).float(), sig.flatten())
        d = self.distance(
            pred.view(b, -1, *pred.shape[1:])[:, : self.s].flatten(0, 1),
            target.repeat_interleave(self.s, 0),
            kimg,
        ).view(b, self.s)
        out = {"loss": (d * self.weights().to(d)).sum(1).mean(), "loss_recon": d[:, 0].mean().detach()}
        if self.keep_x0:  # the student's x_0 for x_T, with its graph: what an adversarial term scores
            out["x0"] = pred.view(b, -1, *pred.shape[1:])[:, 0]
        out["loss_tcons"] = d[:, 1:].mean().detach() if self.s > 1 else torch.zeros(())
        if self.latent_weight > 0:
            out["loss"] = out["loss"] + self.latent_weight * lc.mean()
            out["loss_latent"] = lc.mean().detach()
        if gauge:
            out["loss"] = out["loss"] + self.gauge_weight * gp
            out["loss_gauge"] = gp.detach()
        return out


def latent_consistency(z_from: list[torch.Tensor], z_to: list[torch.Tensor]) -> torch.Tensor:
    """(B,) the latent-consistency residual |evolve(E(x_t), tau_s - tau_t) - E(x_s)|^2 / |E(x_s)|^2, summed over
    the levels (``z_from``: the evolved latents of x_t, ``z_to``: the encodings of the later x_s). Relative, so
    that shrinking every latent (with the decoder scaling back up) cannot make it small. Zero exactly when the
    encoder maps the trajectory onto an orbit of the linear evolution; positive otherwise."""
    num = sum((a - b).square().flatten(1).sum(1) for a, b in zip(z_from, z_to))
    den = sum(b.square().flatten(1).sum(1) for b in z_to)
    return num / den.clamp_min(1e-12)
